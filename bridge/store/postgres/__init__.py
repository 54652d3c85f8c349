"""The PostgreSQL store: several bridges on one database behave as one (issue #13).

`store.PostgresStore` implements `bridge.store.api.Store` from its parts: `ingest`
(group commit, advisory locks on policy's questions), `delivery` (claims with a lease,
takeover, the shared rate window), `queries` (API, console, budgets, metrics,
retention), `leader` (the one instance that runs the singletons). `pool` holds the
connections and turns the driver's failures into StoreUnavailable; `schema` the
numbered migrations; `migrate` applies them and checks the schema before `serve` runs.
"""
