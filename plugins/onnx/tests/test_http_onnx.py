"""An ONNX artifact deployed on the onnx backend answers the official openai client."""

from __future__ import annotations

import openai
import tomli_w

from gptstore.server import create_app
from gptstore.testing import running_server


def test_chat_over_http_on_the_onnx_backend(exported, tmp_path):
    manager, store, _base, onnx, _ = exported
    home = store.root.parent
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "server": {"api_keys": [{"key": "k", "role": "user"}]},
                "deployments": {"tiny-onnx": {"artifact": onnx.id, "backend": "onnx"}},
            }
        )
    )
    with running_server(create_app(home, manager=manager)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        whole = client.chat.completions.create(
            model="tiny-onnx", messages=messages, max_tokens=8, temperature=0
        )
        streamed = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="tiny-onnx", messages=messages, max_tokens=8, temperature=0, stream=True
            )
        )
    assert whole.choices[0].message.content
    assert streamed == whole.choices[0].message.content
