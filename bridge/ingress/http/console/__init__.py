"""The web console at `/ui/`: `app` (the pages), `gate` (sign-in, sessions, CSRF,
headers), `sessions`, `routes` (snippets and preview), `chart`, `activity` (each
route's last call). Mounted by `bridge.ingress.http.app.create_app`; templates and static files
ship inside the package."""
