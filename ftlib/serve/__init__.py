"""Serving: LoRA adapters on Ray Serve behind an OpenAI-compatible HTTP API.

  engine.py      Generator: the base model + named adapters, batched generation (no Ray)
  app.py         the Serve deployment and its FastAPI routes (notebook format, /v1/*, /health)
  vllm_engine.py serve.engine=vllm: which engine serves, the LLM deployment of Ray Serve's LLM library, its handle
  cluster.py     run_node: the Ray cluster of a serve job (head + workers, ports, tokens, endpoint.json), for both
                 engines (serve.engine=vllm: the node under the serving environment's interpreter)
  local.py       serve_foreground / start_local: the same on this machine
  tunnel.py      ssh_command: reach the endpoint through the login node
"""
