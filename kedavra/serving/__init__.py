"""`kedavra serve`: AUTOMATIC1111's HTTP API (/sdapi/v1) and a web page over one pipeline.

Modules, in the order a request meets them:
  kedavra.commands.serve: the `kedavra serve` subcommand: options, the API-key rule for other hosts, uvicorn
  app       the ASGI app: Host / API-key guard, body limit, the page's files; create_app puts it together
  routes    the /sdapi/v1 endpoints, reaching the worker through app.state
  schemas   request and response bodies in A1111's shapes, with their ranges; base64 images
  tasks     a request body checked against the loaded model into the worker's task; A1111's info of its outcome
  errors    how each error is answered: 422 naming the field, 503 with Retry-After, 499 for a client gone
  worker    the bounded queue and the one thread that owns the pipeline; the model catalog
  ray_workers, ray_deployment
            `kedavra serve --ray-replicas N`: the same app over Ray Serve replicas of the worker (docs/scaling.md)

Serving is a layer on top: it imports the pipeline (and builds its GenerationRequest), never the other way round.
"""
