"""The bounds a server keeps, with their defaults: one home for the app, its HTTP layer and the command's flags.

Imports nothing, so `pixtral-mlx serve --help` shows them without loading anything.
"""

MAX_BODY_BYTES = 100 * 1024 * 1024  # a 50 MB image as a data: URL is ~67 MB of base64
IMAGE_TIMEOUT = 10.0  # seconds for a whole image download
BODY_TIMEOUT = 60.0  # seconds for a whole request body, once its headers are in
HEADER_TIMEOUT = 10.0  # seconds for a request's headers
MAX_CONNECTIONS = 64  # open connections; more are answered 503 and closed
SHUTDOWN_GRACE = 5.0  # seconds running requests get to finish on SIGTERM (docker stop kills after 10)
QUEUE = 16  # requests that may wait while one runs; more are answered 429
