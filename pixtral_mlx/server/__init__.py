"""`pixtral-mlx serve`: an OpenAI-compatible HTTP server (schema, engine thread, ASGI app).

`schema` checks requests, `engine` owns the model on one thread, `app` is the Starlette app; the
command itself is `pixtral_mlx.serve`. Importing this package imports nothing heavy.
"""
