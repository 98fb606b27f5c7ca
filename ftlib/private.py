"""This user's private folder on this host, and the environment that points every library's caches and temporary
files into it.

    base = user_base()          /tmp/ftlib-<uid>: created mode 700, refused in one line if someone else made it
    env = library_env()         the variables below, for a child process
    use_private_caches()        the same, for this process and every process it starts from now on

Why. Libraries of the stack keep files at names anyone can compute, in folders created with
`makedirs(exist_ok=True)` wherever they find them: Inductor's compiled code in $TMPDIR/torchinductor_<user> (which the
process then imports and loads), TensorBoard's $TMPDIR/.tensorboard-info (written through whatever link lies there),
vLLM's $TMPDIR/vllm_dist_* files and IPC sockets, Triton's ~/.triton. On a node shared with other users, whoever
creates such a folder first chooses what the owner's processes load or overwrite. So every process ftlib starts
(training ranks, preprocessing tasks, serve nodes and the engine workers under them, TensorBoard) gets, through each
library's own setting:

    TMPDIR                      <base>/tmp        Python's tempfile (TensorBoard's info folder, vLLM's files and
                                                  sockets, Hugging Face's and torch's temporary files)
    TORCHINDUCTOR_CACHE_DIR     <base>/cache/inductor   torch.compile's generated .py/.so files
    TRITON_CACHE_DIR, TRITON_HOME  <base>/cache/triton  Triton's kernels (and its dump/override folders)
    VLLM_CACHE_ROOT             <base>/cache/vllm       vLLM's compile cache and assets
    VLLM_RPC_BASE_PATH          <base>/tmp              vLLM's IPC sockets

The caches outlive a job (what the defaults do too), per user and host. Two caches stay where they are, because a
login node fills them for the compute nodes through the shared home: torch's extensions (TORCH_EXTENSIONS_DIR,
~/.cache/torch_extensions: DeepSpeed's op, prebuilt before a job) and Hugging Face's (HF_HOME, ~/.cache/huggingface:
models, and HF_MODULES_CACHE, remote code). Those folders are checked instead: a folder, or one above it, that
another user may write to (or owns) is refused in one line.

The base folder lives in /tmp, not $TMPDIR: every process of this user on this host must find the same one (the
serve nodes keep their port locks there too), and Unix socket paths under it stay short.
"""
from __future__ import annotations

import os
import pwd
import stat
import tempfile
from pathlib import Path
from typing import Dict, Optional

from ftlib.errors import UserError

TMP_ROOT = Path("/tmp")


class UnsafeDirectory(UserError, RuntimeError):
    """A folder we would keep tokens, locks, caches or temporary files in is not safely ours (one-line message)."""


def private_dir(path: Path) -> Path:
    """`path`, created mode 700 if missing; refused unless it is a real directory (not a symbolic link), owned by
    this user, that nobody else may enter."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a directory"
    elif st.st_uid != os.getuid():
        why = f"belongs to {user_name(st.st_uid)}, not to you"
    elif st.st_mode & 0o077:
        why = f"is open to other users (mode {stat.S_IMODE(st.st_mode):o})"
    if why:
        raise UnsafeDirectory(f"{path} {why}: refusing to keep tokens, caches or temporary files there (someone may "
                              f"have prepared it in advance); remove it and start again")
    return path


def user_base(root: Path = TMP_ROOT) -> Path:
    """root/ftlib-<uid>: this user's private folder on this host. The name can be predicted, so it is checked
    (private_dir), and so is `root`: a world-writable root without the sticky bit would let anyone rename our folder
    away and put theirs in its place."""
    st = os.stat(root)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise UnsafeDirectory(f"{root} is writable by everyone but not sticky: refusing to keep private files there")
    return private_dir(root / f"ftlib-{os.getuid()}")


def open_private(path: Path) -> int:
    """A lock file of ours (created 600; never through a symbolic link; refused if another user owns it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if os.fstat(fd).st_uid != os.getuid():
        os.close(fd)
        raise UnsafeDirectory(f"{path} belongs to {user_name(os.stat(path).st_uid)}, not to you: refusing it")
    return fd


def write_private(path: Path, text: str) -> None:
    """A new file only we can read (600): never an existing file, never through a symbolic link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def user_name(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


# ----------------------------------------------------------------------------------------------------- caches
def library_env(base: Optional[Path] = None) -> Dict[str, str]:
    """The variables that put every library's caches and temporary files into `base` (default user_base()), after
    checking the folders that stay in the home directory (see the module's docstring)."""
    base = base or user_base()
    tmp, cache = private_dir(base / "tmp"), private_dir(base / "cache")
    check_only_mine(extensions_dir(), "torch's extensions (TORCH_EXTENSIONS_DIR)")
    check_only_mine(hf_home(), "Hugging Face's cache (HF_HOME)")
    return {"TMPDIR": str(tmp), "VLLM_RPC_BASE_PATH": str(tmp),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
            "TRITON_HOME": str(cache / "triton"), "TRITON_CACHE_DIR": str(cache / "triton" / "cache"),
            "VLLM_CACHE_ROOT": str(cache / "vllm")}


def use_private_caches(base: Optional[Path] = None) -> Dict[str, str]:
    """library_env() for this process and every process it starts; returns it."""
    env = library_env(base)
    os.environ.update(env)
    tempfile.tempdir = None  # tempfile remembers the folder it found first: look again, at TMPDIR
    return env


def extensions_dir() -> Path:
    """Where torch builds and loads C++ extensions (torch.utils.cpp_extension's rule)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


def hf_home() -> Path:
    """Hugging Face's cache folder (huggingface_hub's rule)."""
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"


def check_only_mine(path: Path, what: str) -> None:
    """Refuse, in one line, a folder that code or data is loaded from when another user may write into it: `path`
    (or, while it does not exist, the folder it would be created in) and every folder above it must belong to this
    user or to root and be writable by nobody else. A sticky folder (like /tmp) is accepted above a folder of ours,
    never as the place a missing folder would be created in (anyone could create it first)."""
    real = Path(os.path.realpath(path))
    first = real
    while not first.exists():
        first = first.parent
    for folder in [first, *first.parents]:
        st = os.stat(folder)
        why = None
        if st.st_uid not in (os.getuid(), 0):
            why = f"{folder} belongs to {user_name(st.st_uid)}"
        elif st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and folder != first):
            why = f"{folder} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
        if why:
            raise UnsafeDirectory(f"{what}: {path}: {why}, so they could put code or files there that your jobs "
                                  f"would load; use a folder only you can write to")
