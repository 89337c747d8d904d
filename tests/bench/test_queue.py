import json

import pytest

from diffspeed.bench.queue import SEED001, TINY, default_queue, load_queue
from diffspeed.errors import DiffspeedError


def test_builtin_queues():
    assert default_queue("tiny-sd") is TINY and default_queue("tiny-sdxl") is TINY
    assert default_queue("/models/sd15") is SEED001 and len(SEED001) == 4
    assert SEED001[2].prompt == "macro shot of a bee collecting nectar from lavender flowers"
    assert SEED001[1].seed == 5567822456  # above 2**32, as published; torch takes 64-bit seeds
    assert load_queue("seed001") is SEED001


def test_queue_files(tmp_path):
    js = tmp_path / "q.json"
    js.write_text(json.dumps([{"prompt": "a red circle at center on a blue background", "seed": 3},
                              {"prompt": "a green star at top on a white background", "negative_prompt": "blur"}]))
    items = load_queue(str(js))
    assert [i.seed for i in items] == [3, 0] and items[1].negative_prompt == "blur"
    toml = tmp_path / "q.toml"
    toml.write_text('[[prompt]]\nprompt = "a white square at left on a black background"\nseed = 9\n')
    assert load_queue(str(toml))[0].seed == 9


@pytest.mark.parametrize(("content", "message"), [
    ("[]", "non-empty list"), ('[{"seed": 1}]', "'prompt'"), ('[{"prompt": "x", "seed": -1}]', "seed must be"),
    ('[{"prompt": "x", "seeds": 1}]', "unknown keys"), ("{oops", "not valid"),
])
def test_bad_queue_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "q.json"
    path.write_text(content)
    with pytest.raises(DiffspeedError) as err:
        load_queue(str(path))
    assert err.value.field == "queue" and message in str(err.value)
