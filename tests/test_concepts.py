"""Concept sources: WordNet offline, banded irrelevant concepts, the optional LLM endpoint (JSON only)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from erase_core.concepts import (build_concept_set, irrelevant_in_bands, llm_irrelevant, parse_llm_bands,
                                 wordnet_similarity, wordnet_synonyms)


def test_wordnet_synonyms_offline():
    syn = wordnet_synonyms("car")
    assert "automobile" in syn and "car" not in syn
    red = wordnet_synonyms("red")  # the colour senses, not the political one (Bolshevik, Marxist)
    assert {"redness", "crimson", "scarlet"} & set(red) and not {"Bolshevik", "Marxist", "bolshie"} & set(red)
    assert "Vincent van Gogh" in wordnet_synonyms("van gogh")  # proper names stay for proper-name concepts


def test_similarity_bands():
    assert wordnet_similarity("dog", "cat") > wordnet_similarity("dog", "theory")
    bands = irrelevant_in_bands("dog", ["cat", "wolf", "car", "theory", "idea", "table"], per_band=2)
    assert set(bands) == {"no_relation", "far", "mid"}
    assert "dog" not in sum(bands.values(), [])
    # an adjective is related to no noun: every candidate lands in one band, and the picks are topped up to K = 3
    assert sum(map(len, irrelevant_in_bands("red", ["tree", "car", "cup", "dog"]).values())) == 1
    topped = irrelevant_in_bands("red", ["tree", "car", "cup", "dog"], total=3)
    assert len(sum(topped.values(), [])) == 3 == len(set(sum(topped.values(), [])))


def test_user_lists_win():
    cs = build_concept_set("nude", ["a nude statue"], synonyms=["naked"], irrelevant=["tree"])
    assert cs.synonyms == ("naked",) and cs.irrelevant == ("tree",)
    auto = build_concept_set("car", ["a red car"], candidates=["truck", "banana", "theory"])
    assert "automobile" in auto.synonyms and auto.irrelevant


def test_preserve_prompts_default_to_irrelevant_concepts_in_the_concepts_sentences():
    cs = build_concept_set("nude", ["a nude girl", "a Nude statue, marble"], synonyms=["naked"],
                           irrelevant=["tree", "cloud", "dog"])
    assert cs.preserve_prompts == ("a tree girl", "a cloud statue, marble", "a dog girl")
    assert build_concept_set("nude", ["a nude girl"], [], ["tree"], preserve_prompts=[]).preserve_prompts == ()
    given = build_concept_set("nude", ["a nude girl"], [], ["tree"], preserve_prompts=["a girl"])
    assert given.preserve_prompts == ("a girl",)


def test_llm_reply_is_parsed_as_json_and_validated():
    good = 'Sure! {"no_relation": ["cloud"], "far": ["bicycle", "ship"], "mid": ["truck"]}'
    assert parse_llm_bands(good, 3)["far"] == ["bicycle", "ship"]
    with pytest.raises(ValueError, match="no JSON"):
        parse_llm_bands("I cannot help", 3)
    with pytest.raises(ValueError, match="'mid' must be a list"):
        parse_llm_bands('{"no_relation": [], "far": [], "mid": "truck"}', 3)
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_llm_bands("{'no_relation': __import__('os')}", 3)


def test_llm_endpoint_round_trip_on_loopback():
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["auth"] = self.headers.get("Authorization")
            content = json.dumps({"no_relation": ["cloud"], "far": ["ship"], "mid": ["truck"]})
            data = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        bands = llm_irrelevant("car", f"http://127.0.0.1:{server.server_port}/v1", "test-model", api_key="k", k=3)
    finally:
        thread.join(5)
        server.server_close()
    assert bands == {"no_relation": ["cloud"], "far": ["ship"], "mid": ["truck"]}
    assert seen["auth"] == "Bearer k" and "car" in seen["body"]["messages"][0]["content"]
