"""index.txt parsing: every revocation form OpenSSL writes, and rejection of bad files."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hsmocsp.errors import SourceError
from hsmocsp.sources.index import (
    IndexData,
    SerialSet,
    parse_index,
    parse_index_file,
    parse_revocation,
)
from hsmocsp.status import CertStatus, CRLReason, Status

TESTDATA = Path(__file__).parent.parent / "testdata" / "openssl"
REVOKED_AT = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
COMPROMISED = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def parse(text: str, name: str = "index.txt") -> IndexData:
    return parse_index_file(io.BytesIO(text.encode()), name)


def row(status: str, revocation: str, serial: str, expiry: str = "301231235959Z") -> str:
    return f"{status}\t{expiry}\t{revocation}\t{serial}\tunknown\t/CN=x {serial}\n"


# --- revocation field: each reason form of apps/ca.c --------------------------------


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("240506070809Z,unspecified", CRLReason.unspecified),
        ("240506070809Z,keyCompromise", CRLReason.keyCompromise),
        ("240506070809Z,CACompromise", CRLReason.cACompromise),
        ("240506070809Z,affiliationChanged", CRLReason.affiliationChanged),
        ("240506070809Z,superseded", CRLReason.superseded),
        ("240506070809Z,cessationOfOperation", CRLReason.cessationOfOperation),
        ("240506070809Z,certificateHold", CRLReason.certificateHold),
        ("240506070809Z,SUPERSEDED", CRLReason.superseded),  # strcasecmp
        ("240506070809Z,cacompromise", CRLReason.cACompromise),
    ],
)
def test_plain_reasons(field: str, reason: CRLReason) -> None:
    parsed = parse_revocation(field)
    assert parsed.status == CertStatus.revoked(REVOKED_AT, reason)
    assert parsed.hold_instruction is None


def test_no_reason_is_none_not_unspecified() -> None:
    parsed = parse_revocation("240506070809Z")
    assert parsed.status == CertStatus.revoked(REVOKED_AT, None)


def test_remove_from_crl_means_good() -> None:
    assert parse_revocation("240506070809Z,removeFromCRL").status is None


@pytest.mark.parametrize(
    ("instruction", "oid"),
    [
        ("holdInstructionNone", "1.2.840.10040.2.1"),
        ("holdInstructionCallIssuer", "1.2.840.10040.2.2"),
        ("holdInstructionReject", "1.2.840.10040.2.3"),
        ("Hold Instruction Reject", "1.2.840.10040.2.3"),
        ("Hold Instruction Call Issuer", "1.2.840.10040.2.2"),
        ("1.2.840.10040.2.3", "1.2.840.10040.2.3"),
        ("1.3.6.1.4.1.99999.7", "1.3.6.1.4.1.99999.7"),
    ],
)
def test_hold_instruction(instruction: str, oid: str) -> None:
    parsed = parse_revocation(f"240506070809Z,holdInstruction,{instruction}")
    assert parsed.status == CertStatus.revoked(REVOKED_AT, CRLReason.certificateHold)
    assert parsed.hold_instruction == oid


@pytest.mark.parametrize(
    ("pseudo", "reason"),
    [("keyTime", CRLReason.keyCompromise), ("CAkeyTime", CRLReason.cACompromise)],
)
@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("20240102030405Z", COMPROMISED),
        ("202401020304Z", datetime(2024, 1, 2, 3, 4, tzinfo=UTC)),  # openssl accepts no seconds
        ("20240102030405.5Z", COMPROMISED),  # fractional seconds dropped
        ("20240102040405+0100", COMPROMISED),
        ("20240102013405-0130", COMPROMISED),
    ],
)
def test_compromise_time_is_invalidity_date(
    pseudo: str, reason: CRLReason, when: str, expected: datetime
) -> None:
    parsed = parse_revocation(f"240506070809Z,{pseudo},{when}")
    assert parsed.status == CertStatus.revoked(REVOKED_AT, reason, expected)


def test_extra_after_plain_reason_is_ignored_like_openssl() -> None:
    parsed = parse_revocation("240506070809Z,superseded,whatever")
    assert parsed.status == CertStatus.revoked(REVOKED_AT, CRLReason.superseded)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("", "without a revocation time"),
        ("notatime", "bad revocation time"),
        ("241306070809Z", "bad revocation time"),  # month 13
        ("240506070809Z,bogus", "unknown revocation reason"),
        ("240506070809Z,", "unknown revocation reason"),
        ("240506070809Z,holdInstruction", "without its hold instruction"),
        ("240506070809Z,holdInstruction,", "without its hold instruction"),
        ("240506070809Z,holdInstruction,commonName", "bad hold instruction"),
        ("240506070809Z,holdInstruction,1.2.x", "bad hold instruction"),
        ("240506070809Z,keyTime", "without its compromise time"),
        ("240506070809Z,CAkeyTime,yesterday", "bad compromise time"),
        ("240506070809Z,keyTime,20240102030405", "bad compromise time"),  # no zone
        ("240506070809Z,keyTime,2024010203Z", "bad compromise time"),
        ("240506070809Z,keyTime,20240230030405Z", "bad compromise time"),  # Feb 30
    ],
)
def test_bad_revocation_fields(field: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_revocation(field)


def test_revocation_time_forms() -> None:
    assert parse_revocation("490506070809Z").status == CertStatus.revoked(
        datetime(2049, 5, 6, 7, 8, 9, tzinfo=UTC)
    )
    assert parse_revocation("500506070809Z").status == CertStatus.revoked(
        datetime(1950, 5, 6, 7, 8, 9, tzinfo=UTC)
    )
    assert parse_revocation("20510506070809Z").status == CertStatus.revoked(
        datetime(2051, 5, 6, 7, 8, 9, tzinfo=UTC)
    )


# --- whole files ----------------------------------------------------------------------


def test_status_mapping() -> None:
    data = parse(
        row("V", "", "01")
        + row("E", "", "02", expiry="200101000000Z")
        + row("R", "240506070809Z,keyTime,20240102030405Z", "0A")
        + row("R", "240506070809Z,removeFromCRL", "0B")
        + row("V", "", "00ABCDEF0123456789ABCDEF0123456789ABCDEF", expiry="20510101000000Z")
    )
    assert data.status(1) == CertStatus.good()
    assert data.status(2) == CertStatus.good()  # expired: good, not "no answer"
    assert data.status(0x0A) == CertStatus.revoked(REVOKED_AT, CRLReason.keyCompromise, COMPROMISED)
    assert data.status(0x0B) == CertStatus.good()
    assert data.status(0xABCDEF0123456789ABCDEF0123456789ABCDEF) == CertStatus.good()
    assert data.status(3).status is Status.unknown
    assert data.status(-1).status is Status.unknown
    assert data.status(1 << 200).status is Status.unknown
    assert sorted(data.serials()) == [1, 2, 0x0A, 0x0B, 0xABCDEF0123456789ABCDEF0123456789ABCDEF]
    assert data.lines == 5


def test_real_openssl_file_vector() -> None:
    """index.txt written by `openssl ca` 3.0 with every -revoke option (see the file)."""
    data = parse_index(TESTDATA / "index-all-reasons.txt")
    at = datetime(2026, 11, 25, 14, 49, 50, tzinfo=UTC)
    assert data.status(0x1000) == CertStatus.revoked(at, CRLReason.keyCompromise)
    assert data.status(0x1001) == CertStatus.revoked(at, CRLReason.keyCompromise, COMPROMISED)
    assert data.status(0x1002) == CertStatus.revoked(at, CRLReason.cACompromise, COMPROMISED)
    assert data.status(0x1003) == CertStatus.revoked(at, CRLReason.certificateHold)
    assert data.hold_instructions[0x1003] == "1.2.840.10040.2.2"
    assert data.hold_instructions[0x1004] == "1.2.840.10040.2.3"
    assert data.status(0x1005) == CertStatus.good()  # removeFromCRL
    assert data.status(0x1006) == CertStatus.revoked(at, None)
    assert data.status(0x1007) == CertStatus.revoked(at, CRLReason.certificateHold)
    assert 0x1007 not in data.hold_instructions
    assert data.status(0x1008) == CertStatus.revoked(at, CRLReason.superseded)
    assert data.hold_instructions[0x1009] == "1.2.840.10040.2.1"
    assert data.status(0x100A).invalidity_date == datetime(2024, 1, 2, 2, 4, 5, tzinfo=UTC)
    assert data.hold_instructions[0x100B] == "1.2.840.10040.2.3"
    assert data.status(0x100E).invalidity_date == datetime(2024, 1, 2, 1, 34, 5, tzinfo=UTC)
    assert data.status(0x100C) == CertStatus.good()
    assert data.status(0x1011).status is Status.unknown


def test_empty_file_comments_and_blank_lines() -> None:
    assert len(parse("").good) == 0
    data = parse("# a comment\n\n" + row("V", "", "05"))
    assert data.status(5) == CertStatus.good()


def test_crlf_file_with_blank_crlf_lines() -> None:
    """An index.txt saved with CRLF line ends (an editor, a copy through Windows): a line
    that is only ``\\r`` is blank, and a revocation written that way is seen."""
    text = row("V", "", "01") + "\n" + row("R", "240506070809Z,keyCompromise", "02") + "\n"
    data = parse(text.replace("\n", "\r\n"))
    assert data.status(1) == CertStatus.good()
    assert data.status(2) == CertStatus.revoked(REVOKED_AT, CRLReason.keyCompromise)
    assert data.lines == 4
    # The last line of a CRLF file still needs its line end.
    with pytest.raises(SourceError, match="no newline"):
        parse(row("V", "", "01").replace("\n", "\r\n") + "V\t301231235959Z\t\t02\tu\t/CN=y\r")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (row("V", "", "01") + "V\t301231235959Z\t\t02\tunknown", 2, "no newline"),
        (row("V", "", "01") + "V\t301231235959Z\t\t02\n", 2, "4 tab-separated fields"),
        (row("X", "", "01"), 1, "bad status 'X'"),
        (row("V", "", "01", expiry="2030"), 1, "bad expiry"),
        (row("V", "", "01", expiry="30123123595AZ"), 1, "bad expiry"),
        (row("V", "", "0x01"), 1, "bad serial"),
        (row("V", "", ""), 1, "bad serial"),
        (row("V", "", "01_02"), 1, "bad serial"),
        (row("V", "", " 01"), 1, "bad serial"),
        (row("V", "240506070809Z", "01"), 1, "status V with a revocation field"),
        (row("R", "", "01"), 1, "without a revocation time"),
        (row("V", "", "01") + row("R", "240506070809Z,nope", "02"), 2, "unknown revocation"),
        (row("R", "240506070809Z", "01") + row("R", "240506070809Z", "01"), 2, "listed twice"),
        (row("R", "240506070809Z,caf\u00e9", "01"), 1, "not ASCII"),
    ],
)
def test_bad_line_rejects_file_with_line_number(text: str, line: int, message: str) -> None:
    with pytest.raises(SourceError, match=message) as info:
        parse(text, "/ca/index.txt")
    assert str(info.value).startswith(f"/ca/index.txt:{line}: ")


@pytest.mark.parametrize(
    "text",
    [
        row("V", "", "01") + row("V", "", "0001"),
        row("V", "", "01") + row("R", "240506070809Z", "01"),
        row("R", "240506070809Z,removeFromCRL", "01") + row("V", "", "01"),
    ],
)
def test_duplicate_serials_rejected(text: str) -> None:
    with pytest.raises(SourceError, match="serial 1 listed twice"):
        parse(text)


def test_missing_file_is_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read"):
        parse_index(tmp_path / "nope.txt")


def test_negative_serial_accepted() -> None:
    data = parse(row("V", "", "-01") + row("V", "", "01"))
    assert data.status(-1) == CertStatus.good()
    assert data.status(1) == CertStatus.good()


# --- SerialSet and the change diff ----------------------------------------------------


def test_changed_serials_reports_revocation_addition_and_reason_change() -> None:
    old = parse(row("V", "", "01") + row("V", "", "02") + row("R", "240506070809Z", "03"))
    new = parse(
        row("R", "240506070809Z,superseded", "01")  # revoked
        + row("V", "", "02")  # unchanged
        + row("R", "240506070809Z,keyCompromise", "03")  # reason changed
        + row("V", "", "04")  # new
    )
    assert old.changed_serials(new) == {1, 3, 4}
    assert new.changed_serials(old) == {1, 3, 4}
    assert old.changed_serials(old) == set()
    assert old.changed_serials(new, limit=2) is None


serial_lists = st.lists(st.integers(min_value=-5, max_value=(1 << 160) - 1), unique=True)


@given(a=serial_lists, b=serial_lists)
def test_serial_set_matches_python_set(a: list[int], b: list[int]) -> None:
    sa, sb = SerialSet.from_ints(list(a)), SerialSet.from_ints(list(b))
    assert set(sa) == set(a)
    assert len(sa) == len(a)
    for s in a:
        assert s in sa
    for s in set(b) - set(a):
        assert s not in sa
    assert sa.symmetric_difference(sb) == set(a) ^ set(b)
    assert (sa == sb) == (set(a) == set(b))


@given(
    base=st.lists(st.integers(min_value=0, max_value=(1 << 64) - 1), unique=True, min_size=1),
    removed=st.sets(st.integers(min_value=0, max_value=1000)),
    added=st.sets(st.integers(min_value=0, max_value=(1 << 64) - 1), max_size=20),
)
def test_serial_set_diff_of_close_sets(base: list[int], removed: set[int], added: set[int]) -> None:
    """The merge walk (large equal runs skipped) agrees with set arithmetic."""
    new = {s for i, s in enumerate(base) if i not in removed} | added
    old_set = SerialSet.from_ints(list(base))
    new_set = SerialSet.from_ints(sorted(new))
    assert old_set.symmetric_difference(new_set) == set(base) ^ new


def test_serial_set_diff_large_runs() -> None:
    base = list(range(0, 300_000, 3))
    new = [*base[1:50_000], 1, *base[50_001:], 10**12]
    diff = SerialSet.from_ints(list(base)).symmetric_difference(SerialSet.from_ints(new))
    assert diff == {0, base[50_000], 1, 10**12}
    limited = SerialSet.from_ints(list(base)).symmetric_difference(
        SerialSet.from_ints(new), limit=3
    )
    assert limited is None
