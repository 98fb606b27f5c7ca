"""Reaching a serve job from your own machine: an SSH tunnel through the login node to the port in endpoint.json.

    ssh -N -o ExitOnForwardFailure=yes -L 8000:<serve node>:<port> <login node>
    curl http://localhost:8000/health
"""
import os
import shlex
from typing import Union

from ftlib.rundir import read_json


def ssh_command(endpoint_json: Union[str, os.PathLike, dict], login_host: str, local_port: int = 8000) -> str:
    """The `ssh -L` command that forwards localhost:<local_port> to the endpoint (endpoint.json's path or its
    contents). It names the address the HTTP proxy listens on, as the login node reaches it."""
    endpoint = endpoint_json if isinstance(endpoint_json, dict) else read_json(endpoint_json)
    if not endpoint:
        raise FileNotFoundError(f"no endpoint: {endpoint_json} does not exist (is the serve job running?)")
    target = f"{local_port}:{endpoint['host']}:{endpoint['port']}"
    return f"ssh -N -o ExitOnForwardFailure=yes -L {target} {shlex.quote(login_host)}"
