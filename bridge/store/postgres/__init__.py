"""The PostgreSQL store: several bridges on one database behave as one (issue #13).

`pool` holds the connections and turns the driver's failures into StoreUnavailable;
`schema` the numbered migrations; `migrate` applies them (`sms-bridge migrate`) and
checks the schema before `serve` runs on it.
"""
