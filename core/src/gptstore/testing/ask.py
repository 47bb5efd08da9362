"""Start ``gptstore serve --config CONFIG`` on a free local port, ask one deployment a chat question
with the official openai client (streamed, printed as it comes), then stop the server.

    python -m gptstore.testing.ask CONFIG MODEL QUESTION [--key KEY]

The key defaults to the first one of CONFIG's ``[server] api_keys``. Needs ``pip install openai``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gptstore.config import Store
from gptstore.server.settings import server_config
from gptstore.testing import serving_process


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("model")
    parser.add_argument("question")
    parser.add_argument("--key")
    args = parser.parse_args(argv)
    import openai

    settings = server_config(Store(), args.config).settings  # checked as serve will
    key = args.key or (settings.api_keys[0].key if settings.api_keys else "none")
    with serving_process("--config", str(args.config)) as base:
        print(f"gptstore serve is ready at {base}; asking {args.model}:", flush=True)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        chunks = client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": args.question}],
            max_tokens=64,
            temperature=0,
            stream=True,
        )
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
