"""Property tests of the three readers that take bytes from elsewhere: the authors'-checkpoint
unpickler, the manifest reader and the server's request validation. Whatever they are given, they
return a value or raise the project's own error (LegoError, or RequestError with a 4xx status);
nothing in a pickle ever runs. Bounded (a few hundred examples each) to keep the suite short."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis: pip install '.[dev]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lego_export.errors import LegoError  # noqa: E402
from lego_export.manifest import Manifest, parse_manifest  # noqa: E402
from lego_export.serve.validation import FIELDS, Limits, RequestError, parse_body, parse_image_request  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny-engines"
PICKLE = ROOT.parent / "shared" / "fixtures" / "official-lego" / "tiny-pg.pkl"
# derandomize: the same examples every run, so a landing is never blocked by a new random draw
BOUNDED = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

JSON_LEAVES = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


# -- the unpickler ----------------------------------------------------------------------------------


def _payloads(canary: Path) -> list[bytes]:
    """Pickle fragments that would run a command, were anything in the file ever executed."""
    command = f"touch {canary}".encode()
    return [
        b"cos\nsystem\n(S'" + command + b"'\ntR.",
        b"cposix\nsystem\n(S'" + command + b"'\ntR.",
        b"cbuiltins\nexec\n(S'open(" + repr(str(canary)).encode() + b', "w")\'\ntR.',
        b'c__builtin__\neval\n(S\'__import__("os").system("' + command + b"\")'\ntR.",
        b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R.",
    ]


@pytest.mark.skipif(not PICKLE.is_file(), reason=f"the authors' fixture is not at {PICKLE}")
@BOUNDED
@given(data=st.data())
def test_mutated_pickles_never_run_anything_and_fail_as_lego_errors(tmp_path, data):
    from lego_export.official.convert import read_network

    original = PICKLE.read_bytes()
    canary = tmp_path / "ran"
    mutation = data.draw(st.sampled_from(["truncate", "flip", "insert", "payload"]))
    head = 4096  # the opcodes live up front; the rest is tensor storage
    if mutation == "truncate":
        blob = original[: data.draw(st.integers(0, len(original) - 1))]
    elif mutation == "flip":
        blob = bytearray(original)
        for at in data.draw(st.lists(st.integers(0, head), min_size=1, max_size=8)):
            blob[at] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    elif mutation == "insert":
        at = data.draw(st.integers(0, head))
        blob = original[:at] + data.draw(st.binary(min_size=1, max_size=32)) + original[at:]
    else:
        at = data.draw(st.integers(0, head))
        blob = original[:at] + data.draw(st.sampled_from(_payloads(canary))) + original[at:]
    path = tmp_path / "mutated.pkl"
    path.write_bytes(blob)
    try:
        read_network(path)
    except LegoError:
        pass
    assert not canary.exists(), "a pickle payload ran"


@BOUNDED
@given(payload=st.sampled_from(range(5)))
def test_payload_pickles_alone_become_inert_records_and_no_network(tmp_path, payload):
    from lego_export.official.convert import read_network
    from lego_export.official.unpickle import Record, load_inert

    canary = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(_payloads(canary)[payload])
    record = load_inert(path)
    assert isinstance(record, Record) and record.name in ("system", "exec", "eval"), record
    with pytest.raises(LegoError):
        read_network(path)
    assert not canary.exists()


# -- the manifest reader ----------------------------------------------------------------------------


def _paths(tree, prefix=()):
    """Every path to a value inside a JSON tree."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


MANIFEST = json.loads((TINY / "manifest.json").read_text())
MANIFEST_PATHS = [p for p in _paths(MANIFEST) if p]


@BOUNDED
@given(edits=st.lists(st.tuples(st.sampled_from(MANIFEST_PATHS), st.sampled_from(["replace", "delete"]), JSON),
                      min_size=1, max_size=4))  # fmt: skip
def test_mangled_manifests_are_read_or_refused_with_a_lego_error(edits):
    data = copy.deepcopy(MANIFEST)
    for path, action, value in edits:
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            if action == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this path
    try:
        assert isinstance(parse_manifest(data), Manifest)
    except LegoError:
        pass


@BOUNDED
@given(blob=st.binary(max_size=512) | JSON.map(lambda v: json.dumps(v).encode()))
def test_manifest_files_of_any_bytes_are_refused_with_a_lego_error(tmp_path, blob):
    (tmp_path / "manifest.json").write_bytes(blob)
    with pytest.raises(LegoError):
        Manifest.read(tmp_path)


# -- request validation -----------------------------------------------------------------------------

TINY_MANIFEST = Manifest.read(TINY)
REQUEST = st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=8), JSON, max_size=6)


def test_a_format_of_the_wrong_type_is_a_400_not_a_crash():  # found by the property test below
    with pytest.raises(RequestError) as e:
        parse_image_request({"format": []}, TINY_MANIFEST, Limits())
    assert e.value.status == 400 and e.value.message.startswith("format must be")


@BOUNDED
@given(body=REQUEST)
def test_any_request_body_is_admitted_or_refused_with_a_4xx_naming_a_field(body):
    try:
        request = parse_image_request(body, TINY_MANIFEST, Limits())
    except RequestError as e:
        assert 400 <= e.status < 500 and e.message and "\n" not in e.message
        return
    assert 1 <= request.num <= Limits().max_images
    request.options.validate(TINY_MANIFEST.model)


@BOUNDED
@given(blob=st.binary(max_size=256) | REQUEST.map(lambda v: json.dumps(v).encode()))
def test_any_body_bytes_parse_to_an_object_or_a_400(blob):
    try:
        assert isinstance(parse_body(blob), dict)
    except RequestError as e:
        assert e.status in (400, 413)
