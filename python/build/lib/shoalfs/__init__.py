"""Shoal dataset versions as an fsspec filesystem, for pods that may not mount.

    import fsspec
    fs = fsspec.filesystem("shoal")                # the local daemon, $SHOAL_HOME
    fs.ls("imagenet@v3/train")
    with fsspec.open("shoal://imagenet@v3/train/n01440764/x.JPEG", "rb") as f:
        data = f.read()
    pyarrow.parquet.read_table("shoal://corpus@v2/part-0.parquet", filesystem=fs)

Every read goes to the local node daemon (`shoal node run`) over its Unix socket
(`$SHOAL_HOME/node.sock`): the daemon reads from its cache, its peers or the origins, verifies
every chunk, and fetches small files whole and sequential readers ahead, exactly as a mount
does. `EpochOrder` hands the daemon a loader's order so it fetches ahead of the workers.
"""

import json
import os
import socket
import threading

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

__all__ = ["ShoalFileSystem", "ShoalError", "EpochOrder", "default_socket"]

# Most bytes one read asks the daemon for (its limit is 64 MiB).
MAX_READ = 16 << 20


class ShoalError(OSError):
    pass


def default_socket():
    """The daemon's socket: $SHOAL_HOME/node.sock, else the default state directory's."""
    home = os.environ.get("SHOAL_HOME")
    if not home:
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "share"
        )
        home = os.path.join(base, "shoal")
    return os.path.join(home, "node.sock")


_ERRNO = {"ENOENT": 2, "ENOTDIR": 20, "EISDIR": 21, "EINVAL": 22, "EIO": 5}


def _raise(reply, path=None):
    code = _ERRNO.get(reply.get("errno"), 5)
    if code == 2:
        raise FileNotFoundError(code, reply["error"], path)
    if code == 21:
        raise IsADirectoryError(code, reply["error"], path)
    if code == 20:
        raise NotADirectoryError(code, reply["error"], path)
    raise ShoalError(code, reply["error"])


class _Session:
    """One connection to the daemon reading one version: one operation at a time."""

    def __init__(self, sock_path, reference, origin):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(sock_path)
        except OSError as e:
            self.sock.close()
            raise ShoalError(
                e.errno or 111,
                f"no shoal node daemon at {sock_path} ({e.strerror}); start one with "
                "`shoal node run`, or set SHOAL_HOME",
            ) from None
        self.r = self.sock.makefile("rb", buffering=1 << 20)
        self.lock = threading.Lock()
        self._send({"op": "files", "reference": reference, "origin": origin})
        hello = self._reply()
        if "ok" not in hello:
            self.close()
            raise ShoalError(5, f"{reference}: {hello.get('error') or hello}")
        self.version = hello["ok"]["version"]
        self.root = hello["ok"]["root"]

    def _send(self, obj):
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def _reply(self):
        line = self.r.readline()
        if not line:
            raise ShoalError(5, "the shoal daemon closed the connection")
        return json.loads(line)

    def call(self, obj, path=None):
        with self.lock:
            self._send(obj)
            reply = self._reply()
        if "ok" not in reply:
            _raise(reply, path)
        return reply["ok"]

    def _recv_exact(self, buf):
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = self.r.readinto(view[got:])
            if not n:
                raise ShoalError(5, "the shoal daemon closed the connection mid-read")
            got += n

    def read(self, path, offset, length=None):
        """`length` bytes from `offset` (to the end of the file when None). Large reads are
        asked for several pieces at a time (the daemon answers in order)."""
        out = []
        ahead = 4
        done = False
        with self.lock:
            asked = []
            while not done or asked:
                while not done and len(asked) < ahead:
                    n = MAX_READ if length is None else min(length, MAX_READ)
                    if n <= 0:
                        done = True
                        break
                    self._send({"op": "read", "path": path, "offset": offset, "len": n})
                    asked.append(n)
                    offset += n
                    if length is not None:
                        length -= n
                    if length is None and len(asked) == 1 and not out:
                        # The first piece tells whether there is more: do not ask ahead
                        # of a small file's only read.
                        break
                if not asked:
                    break
                n = asked.pop(0)
                reply = self._reply()
                if "ok" not in reply:
                    # Drain the answers already asked for, then raise.
                    for _ in asked:
                        r = self._reply()
                        if "ok" in r:
                            self._recv_exact(bytearray(r["ok"]["len"]))
                    _raise(reply, path)
                buf = bytearray(reply["ok"]["len"])
                self._recv_exact(buf)
                out.append(buf)
                if len(buf) < n:
                    done = True
                    for _ in asked:
                        r = self._reply()
                        if "ok" in r:
                            self._recv_exact(bytearray(r["ok"]["len"]))
                    asked = []
        return b"".join(out) if len(out) != 1 else bytes(out[0])

    def close(self):
        try:
            self.r.close()
        finally:
            self.sock.close()


class ShoalFileSystem(AbstractFileSystem):
    """`shoal://NAME@VERSION/path`: a version's files, read through the local daemon.

    Parameters: `socket` (the daemon's socket; default `$SHOAL_HOME/node.sock`), `origin`
    (read from this origin instead of the daemon's own).
    """

    protocol = "shoal"
    root_marker = ""

    def __init__(self, socket=None, origin="", **kwargs):
        super().__init__(**kwargs)
        self.socket_path = socket or default_socket()
        self.origin = origin
        self._sessions = {}
        self._pid = os.getpid()
        self._guard = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("shoal://"):
            path = path[len("shoal://"):]
        return path.strip("/")

    @staticmethod
    def _split(path):
        ref, _, rest = path.partition("/")
        if "@" not in ref:
            raise ValueError(f"shoal path {path!r}: expected NAME@VERSION/path")
        return ref, rest

    def session(self, reference):
        """The connection reading `reference` in this process (a forked worker opens its own)."""
        with self._guard:
            if os.getpid() != self._pid:
                self._sessions = {}
                self._pid = os.getpid()
            s = self._sessions.get(reference)
            if s is None:
                s = _Session(self.socket_path, reference, self.origin)
                self._sessions[reference] = s
            return s

    def _entry(self, ref, parent, e):
        name = f"{ref}/{parent}/{e['name']}" if parent else f"{ref}/{e['name']}"
        return {"name": name, "size": e["size"], "type": e["type"]}

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        ref, rest = self._split(path)
        entries = self.session(ref).call({"op": "ls", "path": rest}, path)
        out = [self._entry(ref, rest, e) for e in entries]
        return out if detail else [e["name"] for e in out]

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        ref, rest = self._split(path)
        e = self.session(ref).call({"op": "stat", "path": rest}, path)
        return {"name": path, "size": e["size"], "type": e["type"]}

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        ref, rest = self._split(path)
        if (start is None or start == 0) and end is None:
            # The whole file in one round trip (no stat first).
            return self.session(ref).read(rest, 0, None)
        size = None
        if start is None or start < 0 or end is None or end < 0:
            size = self.info(path)["size"]
        start = 0 if start is None else (start if start >= 0 else max(0, size + start))
        end = size if end is None else (end if end >= 0 else max(0, size + end))
        if end <= start:
            return b""
        return self.session(ref).read(rest, start, end - start)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode != "rb":
            raise PermissionError(f"shoal versions are read-only (mode {mode!r})")
        return ShoalFile(self, path, mode, block_size or "default", cache_options=cache_options, **kwargs)

    def order(self, reference, paths):
        """Asks the daemon to fetch `paths` of `reference` in this order, ahead of the readers."""
        s = self.session(reference)
        n = 0
        batch = []
        size = 0
        for p in paths:
            batch.append(p)
            size += len(p) + 4
            if size > 512 << 10:
                n += s.call({"op": "order", "paths": batch})
                batch, size = [], 0
        if batch:
            n += s.call({"op": "order", "paths": batch})
        return n


class ShoalFile(AbstractBufferedFile):
    def _fetch_range(self, start, end):
        ref, rest = self.fs._split(self.fs._strip_protocol(self.path))
        return self.fs.session(ref).read(rest, start, end - start)


class EpochOrder:
    """A PyTorch-style sampler helper: each epoch's shuffled order, handed to the daemon.

        order = EpochOrder(fs, "imagenet@v3", files, seed=0)
        for epoch in range(E):
            for i in order.epoch(epoch):     # indices into `files`, shuffled per epoch
                ...                          # a DataLoader's workers read files[i]

    `epoch(e)` tells the daemon the epoch's order before returning it, so the node fetches
    ahead of the loader's workers.
    """

    def __init__(self, fs, reference, files, seed=0):
        self.fs = fs
        self.reference = reference
        self.files = list(files)
        self.seed = seed

    def epoch(self, e):
        import random

        idx = list(range(len(self.files)))
        random.Random(self.seed * 1_000_003 + e).shuffle(idx)
        self.fs.order(self.reference, [self.files[i] for i in idx])
        return idx

    def __len__(self):
        return len(self.files)


# `fsspec.filesystem("shoal")` works once this module is imported, installed or not.
import fsspec as _fsspec  # noqa: E402

_fsspec.register_implementation("shoal", ShoalFileSystem, clobber=True)
