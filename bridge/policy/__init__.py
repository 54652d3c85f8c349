"""Policy: what happens to a message before it is queued. Dedupe and storm decisions
(`decide`), daily budgets (`budgets`) and the shaping every stored text goes through."""
