"""Agent programs for the endpoint tests: ordinary OpenAI-client code, as a user would write it."""

import json
import os
import sys

from openai import OpenAI


def two_calls(base_url, api_key, messages, meta):
    """Asks, then sends the conversation back with a follow-up and asks again; returns meta["reward"]."""
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    first = client.chat.completions.create(model="policy", messages=messages, max_tokens=meta.get("max_tokens", 8))
    messages = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                           {"role": "user", "content": "and again"}]
    client.chat.completions.create(model="policy", messages=messages)
    return meta.get("reward")


def raises(base_url, api_key, messages, meta):
    OpenAI(base_url=base_url, api_key=api_key, max_retries=0).chat.completions.create(model="p", messages=messages)
    raise ValueError("the agent's own bug")


def no_call(base_url, api_key, messages, meta):
    return 1.0


if __name__ == "__main__":  # the "cmd:" form: the prompt row on stdin, the reward printed last
    row = json.load(sys.stdin)
    client = OpenAI(max_retries=0)  # OPENAI_BASE_URL and OPENAI_API_KEY come from the environment
    out = client.completions.create(model="policy", prompt=row["messages"][0]["content"], max_tokens=4)
    print("log line the runner ignores")
    print(json.dumps({"reward": len(out.choices[0].text), "base_url": os.environ["OPENAI_BASE_URL"]}))
