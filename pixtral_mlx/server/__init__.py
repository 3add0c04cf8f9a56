"""`pixtral-mlx serve`: an OpenAI-compatible HTTP server. Importing this package imports nothing heavy.

- `cli`: the command (`flags`: its flags and their checks; `limits`: the bounds and their defaults);
- `settings`: what one server is set up with; `schema`: the request, checked, and the errors' shape;
- `engine`: the thread that owns the model and runs the requests one at a time;
- `app`: the Starlette app and its routes, from `guard` (what is refused before a route runs), `requests`
  (a request turned into the library's messages) and `replies` (the answer, whole or streamed);
- `http`: uvicorn with its bounds (connections, header time) and a graceful stop on SIGTERM.
"""
