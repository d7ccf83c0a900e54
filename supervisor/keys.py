"""CURVE keys for the one socket that may leave the machine: `vmsup launch --listen tcp://HOST:PORT`.

Every other socket is ipc inside the run's private 0700 runtime dir, where file permissions are the
access control. A tcp endpoint has none, so it is a CURVE server (encrypted, and the server proves
who it is) and a ZAP handler accepts only clients whose public key sits in the authorised-clients
directory. `vmsup keys` creates the layout:

    DIR/                          0700  ($XDG_CONFIG_HOME/vmsup/keys or ~/.config/vmsup/keys)
        server.key_secret         0600  the recorder's key pair; never leaves this machine
        server.key                0600  its public half: remote workers need it (curve_serverkey)
        client.key_secret         0600  a key pair for a remote worker: copy it there
        client.key                0600
        authorized_clients/       0700  public keys (*.key) the recorder accepts; add others here
            client.key            0600

Keys are read from DIR by the recorder itself, never passed on a command line (argv is public).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import zmq

from vmworker.errors import VmsupError

SERVER = "server"
CLIENT = "client"
CLIENTS_DIR = "authorized_clients"
# A bus message is at most messages.BUS.max_bytes; a peer on the network that sends more is
# disconnected by libzmq before the message is buffered (ZMQ_MAXMSGSIZE).
_TCP = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(?P<port>[0-9]{1,5})$")


class KeysError(VmsupError):
    """CURVE keys that are missing, unreadable, or not private enough."""


class ListenError(VmsupError):
    """A --listen endpoint that is malformed, not tcp, or cannot be bound."""


def default_keys_dir() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME")
    base = Path(config) if config and os.path.isabs(config) else Path.home() / ".config"
    return base / "vmsup" / "keys"


@dataclass(frozen=True)
class KeyPaths:
    dir: Path

    @property
    def server_public(self) -> Path:
        return self.dir / f"{SERVER}.key"

    @property
    def server_secret(self) -> Path:
        return self.dir / f"{SERVER}.key_secret"

    @property
    def client_public(self) -> Path:
        return self.dir / f"{CLIENT}.key"

    @property
    def client_secret(self) -> Path:
        return self.dir / f"{CLIENT}.key_secret"

    @property
    def clients_dir(self) -> Path:
        return self.dir / CLIENTS_DIR

    @property
    def authorised_client(self) -> Path:
        return self.clients_dir / f"{CLIENT}.key"

    def files(self) -> list[Path]:
        return [self.server_secret, self.server_public, self.client_secret, self.client_public,
                self.authorised_client]


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    clients_dir: Path


@dataclass(frozen=True)
class ClientKeys:
    public: bytes
    secret: bytes
    server_public: bytes


def _need_curve() -> None:
    if not zmq.has("curve"):
        raise KeysError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE: tcp endpoints are unavailable")


def _private_dir(path: Path) -> None:
    """Create `path` 0700, or make an existing one of ours 0700; refuse one that is not ours."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise KeysError(f"cannot create {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise KeysError(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise KeysError(f"{path} belongs to uid {st.st_uid}, not to you: refusing to keep keys there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def create_keys(directory: Path, force: bool = False) -> KeyPaths:
    """A server and a client key pair under `directory`; refuses to replace keys unless `force`."""
    _need_curve()
    paths = KeyPaths(Path(directory))
    existing = [p for p in paths.files() if os.path.lexists(p)]
    if existing and not force:
        raise KeysError(f"CURVE keys already exist in {paths.dir} ({existing[0].name}); "
                        f"use --force to replace them (remote peers will need the new ones)")
    _private_dir(paths.dir)
    _private_dir(paths.clients_dir)
    for p in existing:
        p.unlink()
    import zmq.auth

    # Files are born private (umask) and made 0600 after: zmq.auth writes with the process umask.
    old_umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(paths.dir), SERVER)
        zmq.auth.create_certificates(str(paths.dir), CLIENT)
        shutil.copyfile(paths.client_public, paths.authorised_client)
    except OSError as e:
        raise KeysError(f"cannot write keys in {paths.dir}: {e.strerror or e}") from None
    finally:
        os.umask(old_umask)
    for p in paths.files():
        os.chmod(p, 0o600)
    return paths


def _check_private(path: Path, *, secret: bool) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeysError(f"{path} does not exist") from None
    except OSError as e:
        raise KeysError(f"{path}: {e.strerror or e}") from None
    if st.st_uid != os.getuid():
        raise KeysError(f"{path} belongs to uid {st.st_uid}, not to you: refusing to trust it")
    # A readable secret leaks the key; a directory or key others can write lets them authorise themselves.
    loose = stat.S_IMODE(st.st_mode) & (0o077 if secret else 0o022)
    if loose:
        raise KeysError(f"{path} is accessible to other users (mode {stat.S_IMODE(st.st_mode):o}): "
                        f"chmod {'600' if secret else 'go-w'} it")


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    _check_private(path, secret=secret)
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeysError(f"{path} is not a CURVE key file: {e}") from None
    if secret and not secret_key:
        raise KeysError(f"{path} holds no secret key")
    return public, secret_key


def load_server(directory: Path) -> ServerKeys:
    """The recorder's key pair and where the authorised clients' keys are."""
    _need_curve()
    paths = KeyPaths(Path(directory))
    if not paths.server_secret.exists():
        raise KeysError(f"no CURVE server key in {paths.dir}")
    _check_private(paths.dir, secret=False)
    public, secret = _load(paths.server_secret, secret=True)
    _check_private(paths.clients_dir, secret=False)
    clients = sorted(paths.clients_dir.glob("*.key"))
    if not clients:
        raise KeysError(f"no authorised client keys (*.key) in {paths.clients_dir}: nobody could connect")
    for key in clients:
        _check_private(key, secret=False)
    return ServerKeys(public, secret, paths.clients_dir)


def load_client(directory: Path, name: str = CLIENT) -> ClientKeys:
    """A client's key pair and the server's public key, as `vmsup keys` laid them out."""
    _need_curve()
    paths = KeyPaths(Path(directory))
    public, secret = _load(paths.dir / f"{name}.key_secret", secret=True)
    server_public, _ = _load(paths.server_public, secret=False)
    return ClientKeys(public, secret, server_public)


def configure_client(socket: zmq.Socket, keys: ClientKeys) -> None:
    """Make `socket` a CURVE client of the recorder's tcp endpoint (before connect)."""
    socket.curve_publickey = keys.public
    socket.curve_secretkey = keys.secret
    socket.curve_serverkey = keys.server_public


# Endpoints -------------------------------------------------------------------------------------

def parse_listen(endpoint: str) -> str:
    """Check a --listen value: tcp://HOST:PORT only (HOST an address, interface or *)."""
    if "://" in endpoint and not endpoint.startswith("tcp://"):
        scheme = endpoint.split("://", 1)[0]
        raise ListenError(f"--listen {endpoint}: only tcp://HOST:PORT can be given, not {scheme}:// "
                          f"(a run's local sockets are always in its private runtime dir)")
    m = _TCP.match(endpoint)
    if not m:
        raise ListenError(f"--listen {endpoint!r} is not an endpoint like tcp://127.0.0.1:5555")
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise ListenError(f"--listen {endpoint}: port {port} is not in 1..65535")
    return endpoint


def check_listen(endpoint: str, keys_dir: Optional[str]) -> tuple[str, Path]:
    """What `vmsup launch --listen` checks before any VM starts: the endpoint and usable keys."""
    endpoint = parse_listen(endpoint)
    directory = Path(keys_dir) if keys_dir else default_keys_dir()
    paths = KeyPaths(directory)
    if not paths.server_secret.exists():
        create = "vmsup keys" if keys_dir is None else f"vmsup keys --dir {directory}"
        raise KeysError(f"--listen {endpoint} needs CURVE keys (none in {directory}); create them with '{create}'")
    load_server(directory)
    return endpoint, directory


def curve_server(context: zmq.Context, socket_type: int, endpoint: str, keys_dir: Path,
                 limits):
    """A CURVE server socket bound to `endpoint` that accepts only authorised clients, and the
    ZAP authenticator thread that decides (stop it before destroying the context)."""
    from zmq.auth.thread import ThreadAuthenticator

    keys = load_server(keys_dir)
    auth = ThreadAuthenticator(context)
    auth.start()
    try:
        auth.configure_curve(domain="*", location=str(keys.clients_dir))
        socket = context.socket(socket_type)
        socket.curve_secretkey = keys.secret
        socket.curve_publickey = keys.public
        socket.curve_server = True
        limits.apply(socket)  # a tracetool.wire_limits.WireLimits
        if "[" in endpoint:
            socket.setsockopt(zmq.IPV6, 1)
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as e:
            socket.close(linger=0)
            raise ListenError(f"cannot listen on {endpoint}: {zmq.strerror(e.errno)}") from None
    except BaseException:
        with contextlib.suppress(Exception):
            auth.stop()
        raise
    return auth, socket


# CLI -------------------------------------------------------------------------------------------

def register(app) -> None:
    """Add `vmsup keys` to the Typer app."""
    import typer

    from vmworker import status

    @app.command("keys")
    def keys_command(
        directory: Optional[str] = typer.Option(None, "--dir",
                                                help="Where to keep the keys [$XDG_CONFIG_HOME/vmsup/keys or ~/.config/vmsup/keys]."),
        force: bool = typer.Option(False, "--force", help="Replace existing keys (remote peers then need the new ones)."),
    ) -> None:
        """Create the CURVE keys `vmsup launch --listen tcp://…` needs: a server pair for the recorder
        and a client pair for a remote worker (copy client.key_secret and server.key there). To accept
        another client, put its public .key file in authorized_clients/."""
        try:
            paths = create_keys(Path(directory) if directory else default_keys_dir(), force=force)
        except VmsupError as e:
            typer.echo(f"vmsup: error: {e}", err=True)
            raise typer.Exit(status.EXIT_BAD_INPUT)
        typer.echo(f"created CURVE keys in {paths.dir}")
        typer.echo(f"  recorder (server) secret key: {paths.server_secret}")
        typer.echo(f"  recorder (server) public key: {paths.server_public}  <- remote workers need this")
        typer.echo(f"  client secret key:            {paths.client_secret}  <- copy to the remote worker")
        typer.echo(f"  authorised clients:           {paths.clients_dir}/  (*.key accepted by --listen)")
