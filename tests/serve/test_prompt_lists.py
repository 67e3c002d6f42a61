"""A list of prompts in one completions request, as OpenAI's API takes it (and evaluation
harnesses send it): n choices per prompt, indexed prompt by prompt, each equal to its request
alone; usage counts every prompt."""

from __future__ import annotations

import httpx
import openai
from conftest import KEY

MODEL = "fastblt-default"
PROMPTS = ["def add(a, b):\n", "import sys\n\n\n", "class Point:\n"]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_each_prompt_gets_its_n_choices_in_order(server, reference):
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=16, n=2, temperature=0.8, seed=7,
                             extra_body={"mode": "ar"})  # fmt: skip
    want = [reference.generate(p, mode="ar", max_bytes=16, temperature=0.8, seed=7 + i).text
            for p in PROMPTS[:2] for i in range(2)]  # fmt: skip
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and [ch.text for ch in r.choices] == want
    assert r.usage.prompt_tokens == sum(len(p.encode()) for p in PROMPTS[:2])

    greedy = [reference.generate(p, mode="blt-s", max_bytes=12, temperature=0.0).text for p in PROMPTS]
    r = c.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0, echo=True)
    assert [ch.text for ch in r.choices] == [p + g for p, g in zip(PROMPTS, greedy, strict=True)]

    texts = ["", "", ""]
    for chunk in c.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0, stream=True):
        for part in chunk.choices:
            texts[part.index] += part.text
    assert texts == greedy


def test_sixty_four_choices_and_best_of_n_are_taken(server):
    """The limits are inclusive: 4 prompts x n 16 = 64 choices is answered, and best_of equal to n
    (every choice made is returned) is accepted."""
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=["a"] * 4, n=16, max_tokens=2, temperature=0.5, seed=1)
    assert [ch.index for ch in r.choices] == list(range(64))
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, best_of=2, max_tokens=4, temperature=0)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text


def test_bad_prompt_lists_are_400_naming_the_field(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for prompt, n, needle, param in [([], 1, "empty list", "prompt"), (["a", 3], 1, "prompt[1]: expected a string",
                                      "prompt"), (["a"] * 5, 16, "80 choices", "n"),
                                     ([[1, 2]], 1, "token ids", "prompt")]:  # fmt: skip
        body = {"model": MODEL, "prompt": prompt, "n": n, "max_tokens": 2}
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert needle in r.json()["error"]["message"], r.text
