"""`uv pip`, told this site's pip settings: env/setup.sh installs with it (INSTALLER=auto or uv).

uv reads none of pip's configuration (pip.conf files, PIP_* variables), so on a site that points pip at a mirror,
a certificate bundle or a constraints file, plain uv would go to PyPI with its own certificates instead. This script
asks the environment's own pip for its effective settings (`pip config list`: every configuration file and PIP_*
variable pip reads) and passes each one on in uv's terms. A setting it has no translation for makes it refuse, naming
the setting, and setup.sh then installs with pip.

    python env/uv_pip.py --check             exit 0 if uv can follow every pip setting here, else 3 and one line why
    python env/uv_pip.py install ARGS...     `uv pip install` (the uv beside this python) with those settings

Run it with the interpreter of the environment being built: its pip is the one whose settings count.
"""
from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

# pip's option -> uv's, for the options that say where packages come from (one flag per value).
REPEATED = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
            "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}
# pip's option -> the environment variables uv reads for it.
ENVIRONMENT = {"cert": ("SSL_CERT_FILE",), "client-cert": ("SSL_CLIENT_CERT",), "proxy": ("HTTP_PROXY", "HTTPS_PROXY"),
               "timeout": ("UV_HTTP_TIMEOUT",), "default-timeout": ("UV_HTTP_TIMEOUT",),
               "retries": ("UV_HTTP_RETRIES",)}
# pip's options about its own output and checks, nothing about what is installed or from where; and config-file
# (PIP_CONFIG_FILE), whose settings pip has already merged into the rest.
NO_EFFECT = {"disable-pip-version-check", "no-input", "quiet", "verbose", "progress-bar", "no-color", "log",
             "root-user-action", "no-warn-script-location", "require-virtualenv", "no-python-version-warning",
             "config-file"}
TRUE = {"1", "true", "yes", "on", "y", "t"}
# Where each setting counts for `pip install`, weakest first: a file's [global], its [install], then PIP_* variables.
SECTIONS = ("global", "install", ":env:")


class Untranslatable(Exception):
    pass


def pip_settings(python: str = sys.executable) -> Dict[str, Tuple[str, str]]:
    """pip's effective settings for `pip install`: {option: (value, where it was set)}, as that python's pip reads
    them (its configuration files already merged by pip, user over global)."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    found: Dict[str, Dict[str, str]] = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        section, dot, option = name.partition(".")
        if sep and dot:
            found.setdefault(section, {})[option] = ast.literal_eval(value)
    settings = {}
    for section in SECTIONS:
        for option, value in found.get(section, {}).items():
            where = f"PIP_{option.upper().replace('-', '_')}" if section == ":env:" else f"[{section}] {option}"
            settings[option] = (value, where)
    return settings


def uv_terms(settings: Dict[str, Tuple[str, str]], environ: Dict[str, str]) -> Tuple[List[str], Dict[str, str]]:
    """(uv arguments, uv environment variables) that say what `settings` say to pip; Untranslatable names the first
    setting with no equivalent."""
    args: List[str] = ["--index-strategy", "unsafe-best-match"]  # pip takes the best version among all indexes
    env: Dict[str, str] = {}
    for option, (value, where) in settings.items():
        if option in REPEATED:
            args += [x for item in value.split() for x in (REPEATED[option], item)]
        elif option == "no-index":
            if value.lower() in TRUE:
                args.append("--no-index")
        elif option == "no-cache-dir":  # pip takes any value here as "no cache"
            args.append("--no-cache")
        elif option == "cache-dir":  # a site may keep caches off a small home: uv's goes there too
            env.setdefault("UV_CACHE_DIR", str(Path(value).expanduser() / "uv"))
        elif option in ENVIRONMENT:
            if option.endswith("timeout"):
                value = str(math.ceil(float(value)))  # uv takes whole seconds
            env.update({name: value for name in ENVIRONMENT[option]})
        elif option not in NO_EFFECT:
            raise Untranslatable(f"pip's setting {where} = {value!r} has no uv equivalent here")
    if "SSL_CERT_FILE" not in env:
        # Without a `cert` setting pip verifies with a bundle named by these variables (requests reads them), else
        # its own; uv's counterpart is SSL_CERT_FILE, else the platform's certificates (where a site adds its CA).
        bundle = environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE")
        if bundle and not environ.get("SSL_CERT_FILE"):
            env["SSL_CERT_FILE"] = bundle
        elif not environ.get("SSL_CERT_FILE"):
            args.append("--system-certs")
    if "UV_CACHE_DIR" in environ:
        env.pop("UV_CACHE_DIR", None)  # uv's own setting wins over pip's
    return args, env


def main(argv: List[str]) -> int:
    settings = pip_settings()
    if "--index-url" in argv:  # an index given on the command line replaces the configured one, as with pip
        settings.pop("index-url", None)
    try:
        args, env = uv_terms(settings, dict(os.environ))
    except Untranslatable as e:
        print(e, file=sys.stderr)
        return 3
    if argv == ["--check"]:
        return 0
    if not argv or argv[0] != "install":
        print(__doc__, file=sys.stderr)
        return 2
    uv = Path(sys.executable).parent / "uv"
    target = [] if "--python" in argv else ["--python", sys.executable]  # by default, this python's environment
    command = [str(uv), "pip", "install", *target, "--compile-bytecode", *args, *argv[1:]]
    return subprocess.run(command, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
