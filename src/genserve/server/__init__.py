"""The server: everything between an HTTP request and the engine, grouped by concern. A request goes
http/ (routes, schemas, OpenAPI) -> security/ (who may do what) -> jobs/ (validated, recorded, stored) ->
runtime/ (the asyncio driver: engine decisions carried out on the worker pool) and is watched by observe/
(metrics, usage, cost, logs).

``requests.py`` (a job request and its validation) and ``status.py`` (a job's lifecycle) are the vocabulary every
room speaks. Rooms import only downwards: http -> runtime -> observe -> jobs -> security -> the vocabulary
(tests/test_layering.py states the rules)."""
