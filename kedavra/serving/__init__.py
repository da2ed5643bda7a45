"""`kedavra serve`: AUTOMATIC1111's HTTP API (/sdapi/v1) and a web page over one pipeline.

Modules, in the order a request meets them:
  command   the `kedavra serve` subcommand: options, the API-key rule for non-loopback hosts, uvicorn
  app       the ASGI app: Host / API-key guard, body limit, routes, the page's files
  schemas   request and response bodies in A1111's shapes, with their ranges; base64 images
  worker    the bounded queue and the one thread that owns the pipeline; the model catalog

Serving is a layer on top: it imports the pipeline and the CLI's generation settings, never the other way round.
"""
