"""The upstream SMS provider: its REST client and the sandbox that imitates it."""
