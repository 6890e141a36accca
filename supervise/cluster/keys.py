"""CURVE key files: one key pair per node (``node-R``) plus client key pairs, in one directory.

Files follow libzmq's certificate format (ZPL, as ``zmq.auth`` reads them): ``NAME.key`` holds
the public key, ``NAME.key_secret`` the public and secret keys (mode 0600). Every node loads its
own secret file and the public files of all names; a peer whose public key is not in the
directory is refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs
import zmq
import zmq.auth

from supervise.cluster.errors import CurveKeyError
from supervise.runtime.private import private_dirs

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_BANNER = "#   supervise CURVE {kind} key for {name!r}: {note}\n"


def node_key_name(rank: int) -> str:
    """Key name of a node: ``node-R``."""
    return f"node-{rank}"


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    path.chmod(mode)


def _zpl(name: str, public: bytes, secret: bytes | None) -> str:
    kind = "secret" if secret else "public"
    note = "keep private" if secret else "share with every node"
    lines = [
        _BANNER.format(kind=kind, name=name, note=note),
        "metadata\n",
        "curve\n",
        f'    public-key = "{public.decode("ascii")}"\n',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"\n')
    return "".join(lines)


def generate_keys(
    directory: str | os.PathLike[str],
    nodes: int,
    *,
    clients: tuple[str, ...] = ("client",),
    overwrite: bool = False,
) -> list[Path]:
    """Write key pairs for ``node-0`` .. ``node-{nodes-1}`` and each client name into
    ``directory`` (created if missing); returns the files written.

    Existing key files are kept unless ``overwrite``: regenerating keys of a running cluster
    would lock its nodes out of each other.
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise CurveKeyError(f"nodes = {nodes!r}: must be an integer >= 1")
    names = [node_key_name(r) for r in range(nodes)]
    for c in clients:
        if not _NAME_RE.match(c) or c.startswith("node-"):
            raise CurveKeyError(f"client key name {c!r}: must be [A-Za-z0-9_.-], not node-*")
        names.append(c)
    root = Path(directory)
    try:
        private_dirs(root)  # 0700: nobody else adds a key the nodes would admit
    except OSError as exc:
        raise CurveKeyError(f"cannot create key directory {root}: {exc.strerror}") from None
    written: list[Path] = []
    for name in names:
        pub_path, sec_path = root / f"{name}.key", root / f"{name}.key_secret"
        if not overwrite and (pub_path.exists() or sec_path.exists()):
            raise CurveKeyError(
                f"{pub_path if pub_path.exists() else sec_path} already exists "
                "(pass overwrite=True / --force to replace the keys)"
            )
        public, secret = zmq.curve_keypair()
        try:
            _write(sec_path, _zpl(name, public, secret), 0o600)
            _write(pub_path, _zpl(name, public, None), 0o644)
        except OSError as exc:
            raise CurveKeyError(f"cannot write key files in {root}: {exc.strerror}") from None
        written += [pub_path, sec_path]
    return written


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise CurveKeyError(
            f"CURVE key file {path} not found (create keys with: supervise keys generate "
            f"{path.parent} --nodes N)"
        )
    try:
        public, secret = zmq.auth.load_certificate(path)
    except Exception as exc:
        raise CurveKeyError(f"CURVE key file {path} is unreadable: {exc}") from None
    if public is None or len(public) != 40:
        raise CurveKeyError(f"CURVE key file {path} has no valid public-key")
    if secret is not None and len(secret) != 40:
        raise CurveKeyError(f"CURVE key file {path} has an invalid secret-key")
    return public, secret


@attrs.frozen(slots=True, repr=False)
class CurveKeys:
    """One party's CURVE identity plus every known public key (z85-encoded, 40 bytes each)."""

    name: str
    public: bytes
    secret: bytes
    known: dict[str, bytes]  # name -> public key (z85), this party included

    def __repr__(self) -> str:  # never print the secret key
        return f"CurveKeys(name={self.name!r}, known={sorted(self.known)})"

    @classmethod
    def load(cls, directory: str | os.PathLike[str], name: str) -> CurveKeys:
        """Load ``name``'s key pair and all public keys from ``directory``."""
        root = Path(directory)
        if not root.is_dir():
            raise CurveKeyError(f"CURVE key directory {root} does not exist")
        public, secret = _load(root / f"{name}.key_secret")
        if secret is None:
            raise CurveKeyError(f"CURVE key file {root / (name + '.key_secret')} has no secret")
        known: dict[str, bytes] = {}
        for path in sorted(root.glob("*.key")):
            known[path.stem] = _load(path)[0]
        known[name] = public
        return cls(name=name, public=public, secret=secret, known=known)

    @classmethod
    def for_node(cls, directory: str | os.PathLike[str], rank: int) -> CurveKeys:
        return cls.load(directory, node_key_name(rank))

    def server_key(self, rank: int) -> bytes:
        """Public key of node ``rank`` (what a client must know to connect to it)."""
        key = self.known.get(node_key_name(rank))
        if key is None:
            raise CurveKeyError(f"no public key for {node_key_name(rank)} in the key directory")
        return key
