"""Hub lookups without the network: the local cache, the revision asked for, what a model or tokenizer folder
must hold, and the offline settings (huggingface_hub's cache layout built in tmp_path)."""

import contextlib
import json

import pytest


def fake_cache(tmp_path, monkeypatch, refs: dict[str, str], files=("config.json",)):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--tiny"
    for ref, sha in refs.items():
        (repo / "snapshots" / sha).mkdir(parents=True, exist_ok=True)
        for f in files:
            (repo / "snapshots" / sha / f).write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo


def test_a_cached_hub_model_is_available_offline_and_an_uncached_one_is_named(tmp_path, monkeypatch):
    from simpo_exp.hub import ModelNotFoundError, check_model_available

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_cache(tmp_path, monkeypatch, {"main": "a" * 40})
    check_model_available("org/tiny")  # in the cache: no hub needed
    with pytest.raises(
        ModelNotFoundError, match=r"model .org/other. \(model.path\) is not on this machine.*\(HF_HUB_OFFLINE=1\)"
    ):
        check_model_available("org/other")
    # a pinned revision the cache lacks: named, with the download that fetches it (a bare `hf download` gets main)
    with pytest.raises(ModelNotFoundError, match=r"tiny' at revision 'v9' .*holds it at main; model.revision asks"):
        check_model_available("org/tiny", "v9")
    with pytest.raises(ModelNotFoundError, match=r"`hf download org/tiny --revision v9`"):
        check_model_available("org/tiny", "v9")
    # a pinned revision of a model the cache does not hold at all: no word of another revision it holds
    with pytest.raises(ModelNotFoundError) as caught:
        check_model_available("org/other", "v9")
    assert "at revision 'v9'" in str(caught.value) and "holds it at main" not in str(caught.value)
    # transformers' own offline variable takes the hub offline as well (huggingface_hub reads both)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"\(TRANSFORMERS_OFFLINE=1\)"):
        check_model_available("org/other")


def test_the_hub_commit_follows_the_revision_asked_for(tmp_path, monkeypatch):
    from simpo_exp.hub import hub_commit

    main, tag = "a" * 40, "b" * 40
    fake_cache(tmp_path, monkeypatch, {"main": main, "v2": tag})
    assert hub_commit("org/tiny", None) == main and hub_commit("org/tiny", "v2") == tag == hub_commit("org/tiny", tag)


def test_a_file_the_cache_knows_is_missing_is_none(tmp_path, monkeypatch):
    from simpo_exp.hub import cached_hub_file

    sha = "a" * 40
    repo = fake_cache(tmp_path, monkeypatch, {"main": sha})
    (repo / ".no_exist" / sha).mkdir(parents=True)
    (repo / ".no_exist" / sha / "README.md").write_text("")
    assert cached_hub_file("org/tiny", "README.md") is None
    assert cached_hub_file("org/tiny", "config.json") == repo / "snapshots" / sha / "config.json"


def test_a_tokenizer_folder_is_read_as_json_only_and_needs_no_config(tmp_path, monkeypatch):
    from simpo_exp.hub import ModelNotFoundError, check_model_available

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    check_model_available(str(tok), what="model.tokenizer_path")  # a tokenizer's folder has no config.json
    (tok / "config.json").write_text(json.dumps({"model_type": "newer-than-this", "auto_map": {"AutoConfig": "m.C"}}))
    check_model_available(str(tok), what="model.tokenizer_path", trust_remote_code=False)
    with pytest.raises(ModelNotFoundError, match="a directory without a config.json"):
        check_model_available(str(tmp_path), what="model.path")  # a model folder does


def test_a_config_without_model_type_is_left_to_transformers(tmp_path):
    from simpo_exp.hub import check_model_available

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    check_model_available(str(tmp_path))


def test_a_scorers_own_code_is_refused_under_its_own_key(tmp_path):
    from simpo_exp.hub import ModelNotFoundError, check_model_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mine", "auto_map": {"AutoConfig": "m.C"}}))
    with pytest.raises(ModelNotFoundError, match=r"with scorer.trust_remote_code=true"):
        check_model_config(tmp_path, "scorer.path", trust_remote_code=False)
    check_model_config(tmp_path, "scorer.path", trust_remote_code=None)  # the caller does not say: transformers asks


@pytest.mark.parametrize("path", ["./models/m", "../m", "a/b/c"])
def test_a_relative_local_path_that_is_not_there_is_not_looked_up_on_the_hub(path, tmp_path, monkeypatch):
    from simpo_exp.hub import ModelNotFoundError, check_model_available

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=rf"model.path='{path}' does not exist$"):
        check_model_available(path)


def test_hf_hub_offline_yes_is_offline(monkeypatch):
    import socket
    from types import SimpleNamespace

    from simpo_exp import hub

    probed = []  # a hub that answers: an offline setting must not ask it
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: probed.append(a) or SimpleNamespace(close=int))
    monkeypatch.setattr(hub, "endpoint_answers", lambda conn, endpoint: True)
    for value in ("1", "true", "YES", "yes", "on", "ON"):  # huggingface_hub's own spellings of offline
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.hub_reachable() is False and probed == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub.hub_reachable() is True and probed


def test_the_hub_is_probed_where_its_client_connects_a_mirrors_port_or_the_proxy(monkeypatch):
    """The probe connected to port 443 of the endpoint's host: a mirror on a port of its own (HF_ENDPOINT), or a hub
    reached through HTTPS_PROXY, read as offline, and every model not in the cache was refused."""
    import socket

    from huggingface_hub import constants

    from simpo_exp import hub

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    asked = []
    with _answering(b"HTTP/1.0 404 Not Found\r\n\r\n", asked) as port:  # a mirror on a port of its own
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub.hub_address(constants.ENDPOINT) == ("127.0.0.1", port) and hub.hub_reachable(timeout=5)
    assert asked == ["HEAD / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode()]  # any answer: it is there
    with socket.socket() as listener:  # a mirror that accepts and never answers, then a proxy, on 127.0.0.1
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert not hub.hub_reachable(timeout=1)  # the hub's client would have waited on it for ever
        monkeypatch.setattr(constants, "ENDPOINT", f"https://127.0.0.1:{port}")
        assert not hub.hub_reachable(timeout=1)  # no TLS handshake either
        monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # reached through the proxy alone
        assert not hub.hub_reachable(timeout=5)
        # a proxy that accepts and never answers (a site proxy stalling blocked hosts) is no way to the hub: the
        # hub's client, which reads without a timeout, waited on it for ever
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        assert hub.hub_address(constants.ENDPOINT) == ("127.0.0.1", port) and not hub.hub_reachable(timeout=1)
        assert (
            hub.why_offline()
            == f"the proxy at 127.0.0.1:{port} did not open a way to the hub https://hub.invalid in time"
        )
    # a proxy that opens the tunnel, or refuses it; an http mirror through the proxy: its answer, whatever it is,
    # unless the proxy's own gateway error
    https, http = ("https://hub.invalid", "HTTPS_PROXY"), ("http://mirror.invalid:8080", "HTTP_PROXY")
    connect, head = b"CONNECT hub.invalid:443 HTTP/1.1\r\n", b"HEAD http://mirror.invalid:8080/ HTTP/1.0\r\n"
    cases = [
        (https, b"HTTP/1.1 200 Connection established", True, connect),
        (https, b"HTTP/1.1 403 No", False, connect),
    ]
    cases += [(http, b"HTTP/1.0 404 Not Found", True, head), (http, b"HTTP/1.0 502 Bad Gateway", False, head)]
    for (endpoint, variable), answer, reachable, request in cases:
        asked = []
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        with _answering(answer + b"\r\n\r\n", asked) as port:
            monkeypatch.setenv(variable, f"http://127.0.0.1:{port}")
            assert hub.hub_reachable(timeout=5) is reachable
        assert asked and asked[0].startswith(request)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setenv("NO_PROXY", "hub.invalid")  # the proxy not used for it: the host itself
    assert hub.hub_address(constants.ENDPOINT) == ("hub.invalid", 443) and not hub.hub_proxy(constants.ENDPOINT)


def test_an_https_hub_is_there_when_its_tls_handshake_ends(tmp_path, monkeypatch):
    """A direct https endpoint is probed by a TLS handshake (its certificate not checked: whether something answers,
    not whom to trust); one that speaks no TLS is not there."""
    import shutil
    import socket
    import ssl
    import subprocess
    import threading

    from huggingface_hub import constants

    from simpo_exp import hub

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate with")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve():
            conn, _ = listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)  # until the client closes

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        monkeypatch.setattr(constants, "ENDPOINT", f"https://127.0.0.1:{listener.getsockname()[1]}")
        assert hub.hub_reachable(timeout=5)
        server.join(5)
    with _answering(b"HTTP/1.0 400 Bad Request\r\n\r\n", []) as port:  # plain http where TLS was asked for
        monkeypatch.setattr(constants, "ENDPOINT", f"https://127.0.0.1:{port}")
        assert not hub.hub_reachable(timeout=5)


def test_a_cached_model_with_the_hub_out_of_reach_is_read_from_the_cache_alone(tmp_path, monkeypatch, caplog):
    """transformers asks the hub for each file of a cached model first: an endpoint that accepts connections and
    never answers held the run there for ever (a cached hub model's load waited 5 minutes and more). Where the hub
    does not answer, the process reads the cache alone, as HF_HUB_OFFLINE=1 would have it."""
    import datasets.config
    from huggingface_hub import constants

    from simpo_exp import hub

    fake_cache(tmp_path, monkeypatch, {"main": "a" * 40})
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "0")  # recorded, so that what the switch sets is put back after the test
        monkeypatch.delenv(variable)
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setattr(datasets.config, flag, False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    hub.check_model_available("org/tiny")  # the hub answers: left to it
    assert not constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in hub.os.environ
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with caplog.at_level("WARNING", logger="simpo_exp.hub"):
        hub.check_model_available("org/tiny")
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE and hub.offline_setting()
    assert "model.path='org/tiny' is in the local cache and the hub cannot be reached (nothing answered" in caplog.text
    caplog.clear()  # offline already (set by the user, or by the switch): nothing to say again
    with caplog.at_level("WARNING", logger="simpo_exp.hub"):
        hub.check_model_available("org/tiny")
    assert "cannot be reached" not in caplog.text


@contextlib.contextmanager
def _answering(answer: bytes, asked: list):
    """A proxy on 127.0.0.1 (its port yielded) that answers one request with ``answer``, keeping what it was asked."""
    import socket
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve():
            conn, _ = listener.accept()
            with conn:
                asked.append(conn.recv(1024))
                conn.sendall(answer)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        yield listener.getsockname()[1]
        server.join(5)


def test_a_tokenizer_saved_as_its_config_and_own_vocabulary_file_is_accepted(tmp_path):
    """tiktoken/tekken tokenizers: tokenizer_config.json names a vocabulary file of its own."""
    from simpo_exp.hub import ModelNotFoundError, check_tokenizer_files

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="has no tokenizer files"):
        check_tokenizer_files(str(tmp_path), "model.path")
    (tmp_path / "tokenizer_config.json").write_text('{"vocab_file": "tekken.json"}')
    check_tokenizer_files(str(tmp_path), "model.path")


def test_the_unfinished_save_hint_is_for_a_runs_model_folder_only(tmp_path):
    from simpo_exp.hub import UNFINISHED_SAVE, unfinished_save

    run = tmp_path / "runs" / "R0"
    (run / ".hydra").mkdir(parents=True)
    assert unfinished_save(str(run / "model")) == UNFINISHED_SAVE
    assert unfinished_save(str(run / "checkpoints")) == "" and unfinished_save(str(tmp_path / "other" / "model")) == ""
    # an error without a message (EOFError() of a file cut short) is named by its type, not an IndexError
    from simpo_exp.hub import unreadable_weights

    assert "its weights cannot be read (EOFError: )" in str(unreadable_weights(str(run / "model"), EOFError()))
    assert f"model.path={str(run / 'model')!r}: its weights" in str(unreadable_weights(str(run / "model"), EOFError()))
    # a run's model/ without tokenizer files: the same hint
    from simpo_exp.hub import ModelNotFoundError, check_tokenizer_files

    (run / "model").mkdir()
    (run / "model" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="has no tokenizer files") as err:
        check_tokenizer_files(str(run / "model"), "model.path")
    assert UNFINISHED_SAVE in str(err.value)


def test_an_unknown_model_type_is_named_whatever_trust_remote_code_says(tmp_path):
    """Training passes trust_remote_code=False: a config.json with a misspelt model_type and no code of its own is
    named as such there too (not only with the setting left unset)."""
    from simpo_exp.hub import ModelNotFoundError, check_model_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen22"}))
    for trust in (False, None):
        with pytest.raises(ModelNotFoundError, match=r"model_type='qwen22', which transformers .* does not know"):
            check_model_config(tmp_path, "model.path", trust_remote_code=trust)


def test_a_relative_model_path_not_there_says_where_it_was_looked_for_under_chdir(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    from simpo_exp.hub import ModelNotFoundError, check_model_available

    runtime = SimpleNamespace(runtime=SimpleNamespace(cwd=str(tmp_path / "elsewhere")))
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: runtime))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"does not exist \(looked for in .*hydra.job.chdir=true"):
        check_model_available("./models/m")


def test_a_local_folder_named_like_a_cached_hub_model_has_no_hub_commit(tmp_path, monkeypatch):
    """A local folder ``org/tiny`` (or ``gpt2``) in the working folder is what the run reads: the commit of a cached
    hub model of that name would name files it never read, and model.revision=<it> other weights."""
    from simpo_exp.hub import cached_hub_file, hub_commit

    fake_cache(tmp_path, monkeypatch, {"main": "a" * 40})
    assert hub_commit("org/tiny", None) == "a" * 40
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_commit("org/tiny", None) is None and cached_hub_file("org/tiny", "config.json") is None
