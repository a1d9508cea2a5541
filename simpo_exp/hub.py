"""Finding models and data sets: a local directory, the Hugging Face cache, or the hub when it can be reached.

Shared by the model loader, the data sources and the scorers. When a model is neither on disk nor in the
cache and the hub cannot be reached, ``check_model_available`` says so at once (instead of transformers'
minute of retries) and how to point the config at local files; when it is in the cache and the hub cannot be
reached, the process reads the cache alone (``read_the_cache_alone``): transformers would ask the hub for each file
first, and a host that accepts the connection and never answers held it there for ever (huggingface_hub's client
reads without a timeout).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from simpo_exp.errors import UserError

log = logging.getLogger(__name__)


class ModelNotFoundError(UserError, RuntimeError):
    """The configured model (or tokenizer) cannot be found locally nor downloaded."""


def check_model_config(path: Path, what: str = "model.path", trust_remote_code: bool | None = None) -> None:
    """A local model folder's config.json, read before anything loads: JSON that does not parse, a ``model_type``
    this transformers does not know, or model code of its own (``auto_map``) without ``trust_remote_code`` (where
    the caller says whether it is given) ended in transformers' traceback, after the data was tokenised. A
    tokenizer's folder (``model.tokenizer_path``) is only read as JSON."""
    file = path / "config.json"
    if not file.is_file():
        return
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelNotFoundError(f"{what}={str(path)!r}: {file} cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{what}={str(path)!r}: {file} holds a {type(config).__name__}, not a config")
    if what == "model.tokenizer_path":
        return
    own_code, model_type = config.get("auto_map"), config.get("model_type")
    import transformers
    from transformers import CONFIG_MAPPING

    if model_type is None or model_type in CONFIG_MAPPING:  # a family transformers runs itself (Phi-3's auto_map too)
        return
    if own_code and trust_remote_code is False:
        key = what.rsplit(".", 1)[0] + ".trust_remote_code"
        raise ModelNotFoundError(
            f"{what}={str(path)!r} runs model code of its own (config.json model_type={model_type!r}, auto_map: "
            f"{sorted(own_code)}), which transformers loads only with {key}=true: set it if you trust that code"
        )
    if not own_code:
        raise ModelNotFoundError(
            f"{what}={str(path)!r}: config.json names model_type={model_type!r}, which transformers "
            f"{transformers.__version__} does not know (a typo, or a model newer than this transformers)"
        )


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # huggingface_hub reads the first one set


def offline_variable() -> str | None:
    """The variable that says offline, or None, by huggingface_hub's rule: ``HF_HUB_OFFLINE`` where it is set (not
    empty), else transformers' older ``TRANSFORMERS_OFFLINE``, true in any of its spellings. ``HF_HUB_OFFLINE=0``
    over an inherited ``TRANSFORMERS_OFFLINE=1`` is online there: read each alone, a model the hub would download
    was said to be missing from this machine."""
    key = next((k for k in OFFLINE_VARIABLES if os.environ.get(k)), None)
    return key if key and os.environ[key].lower() in ("1", "true", "yes", "on") else None


def offline_setting() -> bool:
    """Whether the environment sets the hub offline (``offline_variable``)."""
    return offline_variable() is not None


def hub_reachable(timeout: float = 3.0) -> bool:
    if offline_setting():
        return False
    from huggingface_hub import constants

    address, proxied = hub_address(constants.ENDPOINT), hub_proxy(constants.ENDPOINT)
    result: list[bool] = []

    def probe() -> None:  # in a thread: a DNS lookup ignores the socket timeout
        try:
            conn = socket.create_connection(address, timeout=timeout)
            try:
                answers = proxy_answers if proxied else endpoint_answers
                result.append(answers(conn, constants.ENDPOINT))
            finally:
                conn.close()
        except OSError:  # ssl.SSLError and socket timeouts too
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout * 2)  # the connection, then its answer
    return bool(result and result[0])


def endpoint_answers(conn: socket.socket, endpoint: str) -> bool:
    """Whether the hub's host at the other end of ``conn`` answers: a status line to a HEAD request (any: a mirror's
    error comes back at once) for ``http://``, a finished TLS handshake for ``https://`` (its certificate not checked:
    this asks whether something answers, not whom to trust). A host that accepted the connection and never answered
    (a mirror that hangs, a firewall that takes connections) was taken for the hub, and the hub's client, which
    reads without a timeout, waited on it for ever, a cached model's load too."""
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    if url.scheme == "http":
        conn.sendall(f"HEAD / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        return conn.recv(16).startswith(b"HTTP/")
    import ssl

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.wrap_socket(conn, server_hostname=host).close()  # the handshake, under the connection's timeout
    return True


OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_flags() -> list[tuple[object, str]]:
    """(module, attribute) of the offline flags huggingface_hub and datasets read their variables into at import,
    so that setting the variables later changes nothing there (``OFFLINE_ENV`` beside them)."""
    import huggingface_hub.constants

    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE")]
    try:
        import datasets.config
    except ImportError:
        return flags
    return flags + [(datasets.config, k) for k in OFFLINE_ENV if hasattr(datasets.config, k)]


def read_the_cache_alone(what: str, reason: str) -> None:
    """Switch the hub off for the rest of the process, as ``HF_HUB_OFFLINE=1`` at its start would (the variables,
    and the flags huggingface_hub and datasets read them into at import): models and data sets come from the local
    cache alone. Said once."""
    os.environ.update(dict.fromkeys(OFFLINE_ENV, "1"))
    for module, name in offline_flags():
        setattr(module, name, True)
    log.warning(
        "%s is in the local cache and the hub cannot be reached (%s): models and data sets are read from the cache "
        "alone (as under HF_HUB_OFFLINE=1) for the rest of this process (a sweep's later jobs too)", what, reason,
    )  # fmt: skip


def proxy_answers(conn: socket.socket, endpoint: str) -> bool:
    """Whether the HTTP proxy at the other end of ``conn`` passes a request on to the hub at ``endpoint``: a tunnel
    to it opened (CONNECT, for https), or an answer from it (for http) that is not the proxy's gateway error. A
    proxy that accepts connections and never answers (a site proxy stalling blocked hosts) was taken for a way to
    the hub, and the hub's client, which reads without a timeout, waited on it for ever."""
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    if url.scheme == "http":
        target = f"{host}:{url.port or 80}"
        conn.sendall(f"HEAD http://{target}/ HTTP/1.0\r\nHost: {target}\r\n\r\n".encode())
    else:
        target = f"{host}:{url.port or 443}"
        conn.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    status = conn.recv(64).split(b" ", 2)  # b"HTTP/1.1 200 Connection established"
    if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
        return False
    code = int(status[1])
    return 200 <= code < 300 if url.scheme != "http" else code < 500


def hub_proxy(endpoint: str) -> bool:
    """Whether requests to the hub at ``endpoint`` go through a plain HTTP proxy (``hub_address`` connects to it),
    which ``proxy_answers`` can ask in plain text (an ``https://`` proxy speaks TLS first; a SOCKS one, its own)."""
    via = _proxy_for(endpoint)
    return via is not None and via.scheme == "http"


def _proxy_for(endpoint: str):
    """The proxy (parsed) that requests to ``endpoint`` go through, as huggingface_hub's HTTP client picks it from
    ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` and ``NO_PROXY``, or None."""
    import urllib.request

    url = urlparse(endpoint)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme or "https") or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.hostname or "huggingface.co"):
        return None
    via = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return via if via.hostname else None


def why_offline() -> str:
    """Why ``hub_reachable`` said no, in words: the offline setting, or the address that did not answer."""
    from huggingface_hub import constants

    if (variable := offline_variable()) is not None:
        return f"{variable}={os.environ[variable]}"
    host, port = hub_address(constants.ENDPOINT)
    if hub_proxy(constants.ENDPOINT):
        return f"the proxy at {host}:{port} did not open a way to the hub {constants.ENDPOINT} in time"
    return f"nothing answered at {host}:{port}, the hub {constants.ENDPOINT} or the proxy on its way"


def hub_address(endpoint: str) -> tuple[str, int]:
    """Where a request to the hub at ``endpoint`` (``HF_ENDPOINT``) first connects: the endpoint's host and port
    (a mirror's ``http://mirror:8080`` included), or the proxy's where ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``
    sends it there (unless ``NO_PROXY`` names the host), as huggingface_hub's HTTP client does. Probed on port 443 of
    the endpoint's host alone, a node that reaches the hub only through its proxy, or a mirror on a port of its own,
    was taken for offline, and every model not in the cache refused."""
    url = urlparse(endpoint)
    defaults = {"http": 80, "https": 443}
    if (via := _proxy_for(endpoint)) is not None:
        return via.hostname, via.port or defaults.get(via.scheme, 1080)  # 1080: a SOCKS proxy's
    return url.hostname or "huggingface.co", url.port or defaults.get(url.scheme, 443)


def in_hf_cache(repo_id: str, revision: str | None) -> bool:
    return hub_commit(repo_id, revision) is not None


# What a saved tokenizer leaves, one of them at least (fast tokenizers, SentencePiece, BPE vocabularies; the
# config, which may name a vocabulary file of its own: tiktoken, tekken)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
    "tokenizer_config.json",
)


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of ``repo_id`` at ``revision`` (a branch, a tag, a commit; None: main) that the local cache holds
    its config.json from, or None (not a hub model, or not downloaded): an unpinned preset follows ``main``, and
    this names the files a run actually read (``model.revision=<it>`` repeats them)."""
    hit = cached_hub_file(repo_id, "config.json", revision)
    return hit.parent.name if hit is not None else None


def cached_hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """``filename`` of hub model ``repo_id`` at ``revision`` where the local cache holds it (nothing is downloaded);
    None for a local path, a name that is no valid repo id, or a file not downloaded."""
    if Path(repo_id).expanduser().exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # an id that is not a valid repo name (a local path that is not there)
        return None
    return Path(hit) if isinstance(hit, str) else None


def check_tokenizer_files(path: str, what: str) -> None:
    """A local model directory without a tokenizer would fail deep inside transformers ("Couldn't instantiate
    the backend tokenizer"): say which directory and what to set instead."""
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"{what}={path!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            f"there, or set model.tokenizer_path to a directory or hub id that has them{unfinished_save(path)}"
        )


# where a local model directory is a training run's model/, its save may have been cut short
UNFINISHED_SAVE = (
    ". A run's model/ is left so by a run killed while it saved its model (the run has no finished.json): run that "
    "run's command again to finish it (it resumes from its last checkpoint)"
)


def unfinished_save(path: str) -> str:
    """The hint about a run killed while saving, where ``path`` is a training run's ``model/``."""
    path = Path(path)
    return UNFINISHED_SAVE if path.name == "model" and (path.parent / ".hydra").is_dir() else ""


def unreadable_weights(path: str, err: Exception) -> ModelNotFoundError:
    """The error for a local model directory whose weights do not load (cut short, or missing)."""
    first = (str(err).splitlines() or [""])[0]  # an EOFError() has no message at all
    return ModelNotFoundError(
        f"model.path={path!r}: its weights cannot be read ({type(err).__name__}: {first[:300]}){unfinished_save(path)}"
    )


def looks_like_local_path(path: str) -> bool:
    """A hub id is "name" or "org/name"; "./x", "/x", "~/x" or "a/b/c" can only be a local path."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def looked_in(path: str) -> str:
    """For a message about a relative ``path`` that is not there: where it was looked for, when the job runs in
    another folder than the command was given in (``hydra.job.chdir=true``); else nothing."""
    if Path(path).is_absolute():
        return ""
    try:
        from hydra.core.hydra_config import HydraConfig

        started = HydraConfig.get().runtime.cwd if HydraConfig.initialized() else None
    except Exception:  # outside a Hydra job, or a Hydra that has no runtime.cwd
        started = None
    if not started or os.path.realpath(started) == os.path.realpath(os.getcwd()):
        return ""
    return (
        f" (looked for in {os.getcwd()}: hydra.job.chdir=true runs the job in its own folder; give an absolute "
        f"path, or ${{hydra:runtime.cwd}}/{path})"
    )


def check_model_available(
    path: str, revision: str | None = None, what: str = "model.path", trust_remote_code: bool | None = None
) -> None:
    """Raise ModelNotFoundError unless ``path`` is a local directory, cached, or downloadable; a local directory's
    config.json is read as transformers will read it (``check_model_config``)."""
    if Path(path).is_dir():
        if not (Path(path) / "config.json").exists() and what == "model.path":
            inside = Path(path) / "model"  # a run's folder: its trained model is in model/
            hint = f"; the run's trained model is {what}={str(inside)!r}" if (inside / "config.json").is_file() else ""
            raise ModelNotFoundError(f"{what}={path!r} is a directory without a config.json: not a saved model{hint}")
        check_model_config(Path(path), what, trust_remote_code)
        return
    if Path(path).exists():
        raise ModelNotFoundError(f"{what}={path!r} is a file: give the directory that holds the model's files")
    if looks_like_local_path(path):
        raise ModelNotFoundError(f"{what}={path!r} does not exist{looked_in(path)}")
    if in_hf_cache(path, revision):
        if not offline_setting() and not hub_reachable():  # transformers would ask the hub for each file first
            read_the_cache_alone(f"{what}={path!r}", why_offline())
        return
    if hub_reachable():
        return
    at, flag = (f" at revision {revision!r}", f" --revision {revision}") if revision else ("", "")
    elsewhere = (
        f" (the cache holds it at main; {what.split('.')[0]}.revision asks for another)"
        if revision and in_hf_cache(path, None)
        else ""
    )
    raise ModelNotFoundError(
        f"model {path!r}{at} ({what}) is not on this machine: it is not a local directory, not in the Hugging Face "
        f"cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}){elsewhere}, and the hub cannot be reached "
        f"({why_offline()}). Download it on a connected machine (`hf download {path}{flag}`) and either copy the "
        f"cache here or set {what}=/path/to/local/weights."
    )
