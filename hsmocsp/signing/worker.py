"""The signing worker: a child process holding one logged-in PKCS#11 session.

Run as ``python -m hsmocsp.signing.worker`` by :class:`hsmocsp.signing.pool.TokenPool`,
never by hand. Why a process: PyKCS11 keeps the GIL inside C_Sign, so signing in
a thread of the responder would freeze its reactor; and a vendor module that
crashes or hangs takes only this process with it.

Protocol (see :mod:`hsmocsp.signing.wire`): requests arrive on stdin, replies
leave on the original stdout, one reply per request, in order. The first request
is ``init`` and carries the PIN, so the PIN is never on a command line or in the
environment. Before loading the vendor module fd 1 is pointed at stderr, so
anything the module prints lands in the parent's log instead of corrupting the
reply stream. EOF on stdin (the parent stopped or died) ends the worker.

The worker is single-threaded and strictly request/reply, so it needs no locks.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hsmocsp.coredump import forbid_core_dumps
from hsmocsp.signing import wire

# Errors after which this session (or the module) is unusable: reply, then exit so
# the pool starts a fresh process that re-initialises the module and logs in again.
_FATAL = frozenset(
    {
        "CKR_SESSION_HANDLE_INVALID",
        "CKR_SESSION_CLOSED",
        "CKR_DEVICE_REMOVED",
        "CKR_DEVICE_ERROR",
        "CKR_DEVICE_MEMORY",
        "CKR_HOST_MEMORY",
        "CKR_TOKEN_NOT_PRESENT",
        "CKR_USER_NOT_LOGGED_IN",
        "CKR_CRYPTOKI_NOT_INITIALIZED",
        "CKR_GENERAL_ERROR",
    }
)

# Errors that say this request (key, mechanism, data) is wrong: retrying will not help.
_REQUEST_ERRORS = frozenset(
    {
        "CKR_MECHANISM_INVALID",
        "CKR_MECHANISM_PARAM_INVALID",
        "CKR_KEY_TYPE_INCONSISTENT",
        "CKR_KEY_FUNCTION_NOT_PERMITTED",
        "CKR_KEY_SIZE_RANGE",
        "CKR_DATA_LEN_RANGE",
        "CKR_DATA_INVALID",
        "CKR_FUNCTION_NOT_SUPPORTED",
    }
)

# Signing mechanisms the pool may ask for; anything else is refused before C_SignInit.
MECHANISMS = frozenset(
    {
        "CKM_SHA256_RSA_PKCS",
        "CKM_SHA384_RSA_PKCS",
        "CKM_SHA512_RSA_PKCS",
        "CKM_ECDSA",
    }
)

# CKA_EC_PARAMS (DER namedCurve OID) -> cryptography curve name.
_CURVES = {
    bytes.fromhex("06082a8648ce3d030107"): "secp256r1",
    bytes.fromhex("06052b81040022"): "secp384r1",
    bytes.fromhex("06052b81040023"): "secp521r1",
}


# Login refusals that say "this PIN": never to be tried again with the same PIN.
PIN_ERRORS = frozenset(
    {"CKR_PIN_INCORRECT", "CKR_PIN_LOCKED", "CKR_PIN_EXPIRED", "CKR_PIN_LEN_RANGE",
     "CKR_PIN_INVALID"}
)


class Failure(Exception):
    """A reply of kind ``error`` (-> SignerError), ``unavailable`` (-> SignerUnavailable),
    ``pin`` (the token refused the PIN: -> PinRefused, never retried with this PIN) or
    ``missing`` (no such key: an error unless the pool knows the key existed).

    ``fatal`` makes the worker exit after replying.
    """

    def __init__(self, kind: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.fatal = fatal


def _swig_vector_reader() -> Callable[[Any], bytes]:
    """How to turn PyKCS11's ``ckbytelist`` results into ``bytes``, chosen once.

    ``bytes(ckbytelist)`` walks the SWIG ``std::vector<unsigned char>`` one
    element at a time through a Python-level iterator: 79 us for an RSA-2048
    signature, 14 % of SoftHSM's whole C_Sign (measured). The vector's first
    two words are its begin and end pointers (libstdc++ and libc++ both lay
    it out so), which lets ``ctypes.string_at`` copy it in about 1 us. That is
    an ABI assumption, so it is checked here on a probe vector of all 256
    byte values and used only if it reads exactly what ``bytes()`` reads;
    every read also checks the length against ``len()`` (and takes the slow
    way if it differs).
    """
    import ctypes

    import PyKCS11

    word = ctypes.sizeof(ctypes.c_void_p)

    def direct(vector: Any) -> bytes:
        address = int(vector.this)
        begin = ctypes.c_void_p.from_address(address).value or 0
        end = ctypes.c_void_p.from_address(address + word).value or 0
        if end - begin != len(vector):  # not the layout we checked: the slow, sure way
            return bytes(vector)
        return ctypes.string_at(begin, end - begin) if end > begin else b""

    probe_bytes = bytes(range(256)) * 3
    try:
        probe = PyKCS11.ckbytelist(probe_bytes)
        if direct(probe) == bytes(probe) == probe_bytes and direct(PyKCS11.ckbytelist()) == b"":
            return direct
    except (AttributeError, TypeError, ValueError):
        pass
    return bytes


def _ckr_name(err: Exception) -> str:
    """The CKR_* name of a PyKCS11Error (``CKR_PIN_INCORRECT``), or its text."""
    import PyKCS11

    value = getattr(err, "value", None)
    name = PyKCS11.CKR.get(value) if isinstance(value, int) else None
    return name if isinstance(name, str) else str(err)


def _from_pkcs11(err: Exception, what: str) -> Failure:
    name = _ckr_name(err)
    if name in _FATAL:
        return Failure("unavailable", f"{what}: {name}", fatal=True)
    if name in _REQUEST_ERRORS:
        return Failure("error", f"{what}: {name}")
    return Failure("unavailable", f"{what}: {name}")


class Token:
    """One module, one token, one session, one login; key handles cached by (label, id)."""

    def __init__(self, module: str, token_label: str | None, slot: int | None) -> None:
        self.module = module
        self.token_label = token_label
        self.slot = slot
        self._session: Any = None
        self._lib: Any = None
        self._handles: dict[tuple[str | None, bytes | None, int], Any] = {}
        # Private keys found at least once: one of these vanishing means the token
        # (or its storage) went away, not that the configuration is wrong.
        self._seen: set[tuple[str | None, bytes | None]] = set()
        self._to_bytes: Callable[[Any], bytes] = bytes

    @property
    def where(self) -> str:
        return wire.token_location(self.module, self.token_label, self.slot)

    def open(self, pin: str) -> None:
        """Load the module, find the token, open one session and log in as user."""
        import PyKCS11

        if not os.path.exists(self.module):
            raise Failure("error", f"PKCS#11 module {self.module} does not exist")
        lib = PyKCS11.PyKCS11Lib()
        try:
            lib.load(self.module)
        except PyKCS11.PyKCS11Error as err:
            raise Failure("error", f"cannot load PKCS#11 module {self.module}: {err}") from err
        self._lib = lib
        self._to_bytes = _swig_vector_reader()
        try:
            slot = self._find_slot(lib)
            session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
        except PyKCS11.PyKCS11Error as err:
            raise Failure("error", f"cannot open a session on {self.where}: {err}") from err
        try:
            session.login(pin, PyKCS11.CKU_USER)
        except PyKCS11.PyKCS11Error as err:
            name = _ckr_name(err)
            # Login state belongs to the application, not the session: already
            # logged in is success (a second session of the same process).
            if name != "CKR_USER_ALREADY_LOGGED_IN":
                if name == "CKR_PIN_INCORRECT":
                    raise Failure("pin", f"wrong PIN for {self.where}") from err
                if name == "CKR_PIN_LOCKED":
                    raise Failure("pin", f"PIN locked for {self.where}") from err
                if name in PIN_ERRORS:
                    raise Failure("pin", f"PIN refused by {self.where}: {name}") from err
                raise Failure("error", f"login failed on {self.where}: {name}") from err
        self._session = session

    def _find_slot(self, lib: Any) -> Any:
        slots = lib.getSlotList(tokenPresent=True)
        if self.token_label is None:
            if self.slot in slots:
                return self.slot
            raise Failure(
                "error", f"no token in slot {self.slot} of PKCS#11 module {self.module}"
            )
        labels = []
        for slot in slots:
            label = lib.getTokenInfo(slot).label.strip().rstrip("\x00")
            if label == self.token_label and (self.slot is None or slot == self.slot):
                return slot
            labels.append(label)
        raise Failure(
            "error",
            f"no token labelled {self.token_label!r} in PKCS#11 module {self.module}"
            f" (present: {', '.join(repr(x) for x in labels) or 'none'})",
        )

    # --- objects ------------------------------------------------------------------------

    @staticmethod
    def describe_key(label: str | None, key_id: bytes | None) -> str:
        parts = []
        if label is not None:
            parts.append(f"label {label!r}")
        if key_id is not None:
            parts.append(f"id {key_id.hex()}")
        return "key with " + " and ".join(parts)

    def _find(self, label: str | None, key_id: bytes | None, cls: int) -> Any | None:
        import PyKCS11

        cache_key = (label, key_id, cls)
        if cache_key in self._handles:
            return self._handles[cache_key]
        template: list[tuple[int, Any]] = [(PyKCS11.CKA_CLASS, cls)]
        if label is not None:
            template.append((PyKCS11.CKA_LABEL, label))
        if key_id is not None:
            template.append((PyKCS11.CKA_ID, tuple(key_id)))
        try:
            found = self._session.findObjects(template)
        except PyKCS11.PyKCS11Error as err:
            raise _from_pkcs11(err, f"looking up {self.describe_key(label, key_id)}") from err
        if len(found) > 1:
            raise Failure(
                "error",
                f"{len(found)} objects match {self.describe_key(label, key_id)} on {self.where};"
                " give both label and id",
            )
        handle = found[0] if found else None
        if handle is not None:
            self._handles[cache_key] = handle
        return handle

    def private_key(self, label: str | None, key_id: bytes | None) -> Any:
        import PyKCS11

        handle = self._find(label, key_id, PyKCS11.CKO_PRIVATE_KEY)
        if handle is None:
            what = self.describe_key(label, key_id)
            if (label, key_id) in self._seen:
                # It was here: the token went away under us (SoftHSM's directory
                # moved, a USB token pulled). This process's module state is stale;
                # a fresh process (a fresh C_Initialize) is what finds it again.
                raise Failure("unavailable", f"{what} gone from {self.where}", fatal=True)
            raise Failure("missing", f"no private {what} on {self.where}")
        self._seen.add((label, key_id))
        return handle

    def forget(self) -> None:
        self._handles.clear()

    # --- operations ---------------------------------------------------------------------

    def sign(self, label: str | None, key_id: bytes | None, mechanism: str, data: bytes) -> bytes:
        import PyKCS11

        if mechanism not in MECHANISMS:
            raise Failure("error", f"mechanism {mechanism} is not allowed")
        mech = PyKCS11.Mechanism(PyKCS11.CKM[mechanism], None)
        for attempt in (1, 2):
            handle = self.private_key(label, key_id)
            try:
                return self._to_bytes(self._session.sign(handle, data, mech))
            except PyKCS11.PyKCS11Error as err:
                name = _ckr_name(err)
                if attempt == 1 and name in ("CKR_KEY_HANDLE_INVALID", "CKR_OBJECT_HANDLE_INVALID"):
                    # The object was re-created since we cached its handle: look it up again.
                    self.forget()
                    continue
                raise _from_pkcs11(
                    err, f"signing with {self.describe_key(label, key_id)} on {self.where}"
                ) from err
        raise AssertionError("unreachable")

    def public_key(self, label: str | None, key_id: bytes | None) -> bytes:
        """SubjectPublicKeyInfo DER of the key's public half.

        From the CKO_PUBLIC_KEY object with the same label/id if there is one, else
        from the private key's own public attributes (RSA modulus and exponent;
        some tokens also keep CKA_EC_POINT on EC private keys).
        """
        import PyKCS11

        what = self.describe_key(label, key_id)
        private = self.private_key(label, key_id)  # the key we sign with must exist
        public = self._find(label, key_id, PyKCS11.CKO_PUBLIC_KEY)
        obj = public if public is not None else private
        try:
            (key_type,) = self._session.getAttributeValue(obj, [PyKCS11.CKA_KEY_TYPE])
            if key_type == PyKCS11.CKK_RSA:
                modulus, exponent = self._session.getAttributeValue(
                    obj, [PyKCS11.CKA_MODULUS, PyKCS11.CKA_PUBLIC_EXPONENT], allAsBinary=True
                )
                return _rsa_spki(bytes(modulus), bytes(exponent), what)
            if key_type == PyKCS11.CKK_EC:
                params, point = self._session.getAttributeValue(
                    obj, [PyKCS11.CKA_EC_PARAMS, PyKCS11.CKA_EC_POINT], allAsBinary=True
                )
                return _ec_spki(bytes(params), bytes(point or b""), what)
        except PyKCS11.PyKCS11Error as err:
            raise _from_pkcs11(err, f"reading the public half of {what} on {self.where}") from err
        raise Failure("error", f"{what} on {self.where} is neither RSA nor EC")

    def check(self) -> None:
        """A cheap round trip to the token: the session is alive and logged in, and
        every key used so far is still there (looked up afresh, not from the cache:
        a session can outlive its token's storage, as SoftHSM's does)."""
        import PyKCS11

        try:
            info = self._session.getSessionInfo()
        except PyKCS11.PyKCS11Error as err:
            raise _from_pkcs11(err, f"session check on {self.where}") from err
        if info.state not in (PyKCS11.CKS_RO_USER_FUNCTIONS, PyKCS11.CKS_RW_USER_FUNCTIONS):
            raise Failure("unavailable", f"session on {self.where} is not logged in", fatal=True)
        if self._seen:
            self.forget()
            for label, key_id in sorted(self._seen, key=repr):
                self.private_key(label, key_id)


def _rsa_spki(modulus: bytes, exponent: bytes, what: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if not modulus or not exponent:
        raise Failure("error", f"{what}: token gave no RSA modulus/exponent")
    numbers = rsa.RSAPublicNumbers(int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big"))
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ec_spki(params: bytes, point: bytes, what: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    name = _CURVES.get(params)
    if name is None:
        raise Failure("error", f"{what}: unsupported EC parameters {params.hex()}")
    if not point:
        raise Failure("error", f"{what}: no CKA_EC_POINT (is there a public key object?)")
    curve = _curve(name)
    candidates = []
    # PKCS#11 says CKA_EC_POINT is a DER OCTET STRING; some modules give the raw point.
    if len(point) > 2 and point[0] == 0x04:
        if point[1] < 0x80 and point[1] == len(point) - 2:
            candidates.append(point[2:])
        elif point[1] == 0x81 and len(point) > 3 and point[2] == len(point) - 3:
            candidates.append(point[3:])
    candidates.append(point)
    for candidate in candidates:
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(curve, candidate)
        except ValueError:
            continue
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    raise Failure("error", f"{what}: CKA_EC_POINT is not a point on {name}")


def _curve(name: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    curves: dict[str, ec.EllipticCurve] = {
        "secp256r1": ec.SECP256R1(),
        "secp384r1": ec.SECP384R1(),
        "secp521r1": ec.SECP521R1(),
    }
    return curves[name]


def _die_with_parent() -> None:
    """Linux: get SIGKILL if the responder dies, so no orphan keeps a session open."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _key_ref(message: dict[str, Any]) -> tuple[str | None, bytes | None]:
    label = message.get("label")
    key_id = message.get("key_id_b64")
    if label is not None and not isinstance(label, str):
        raise Failure("error", "bad key label")
    return label, (wire.unb64(key_id) if key_id is not None else None)


def handle(token: Token, message: wire.Frame) -> bytes | None:
    """Run one request: the result bytes (sign, public_key) or None (check)."""
    if isinstance(message, wire.SignRequest):
        return token.sign(message.label, message.key_id, message.mechanism, message.data)
    if not isinstance(message, dict):
        raise Failure("error", "unexpected frame")
    op = message.get("op")
    if op == "sign":  # a mechanism without a binary code: refused by token.sign
        label, key_id = _key_ref(message)
        mechanism = message.get("mechanism")
        if not isinstance(mechanism, str):
            raise Failure("error", "bad mechanism")
        return token.sign(label, key_id, mechanism, wire.unb64(message.get("data_b64")))
    if op == "public_key":
        label, key_id = _key_ref(message)
        return token.public_key(label, key_id)
    if op == "check":
        token.check()
        return None
    raise Failure("error", f"unknown operation {op!r}")


def _request_id(message: wire.Frame) -> Any:
    if isinstance(message, dict):
        return message.get("id")
    return message.id


def reply_for(request_id: Any, result: bytes | None) -> bytes:
    """The frame answering a successful request: binary with bytes, JSON without."""
    if result is not None and isinstance(request_id, int):
        return wire.encode_result(request_id, result)
    if result is not None:
        return wire.encode({"id": request_id, "ok": True, "result_b64": wire.b64(result)})
    return wire.encode({"id": request_id, "ok": True})


class _Channel:
    def __init__(self, in_fd: int, out_fd: int) -> None:
        self._in = in_fd
        self._out = out_fd
        self._decoder = wire.Decoder()
        self._pending: collections.deque[wire.Frame] = collections.deque()

    def read(self) -> wire.Frame | None:
        while not self._pending:
            chunk = os.read(self._in, 65536)
            if not chunk:
                return None
            self._pending.extend(self._decoder.feed(chunk))
        return self._pending.popleft()

    def write(self, message: dict[str, Any]) -> None:
        self.write_frame(wire.encode(message))

    def write_frame(self, data: bytes) -> None:
        while data:
            written = os.write(self._out, data)
            data = data[written:]


def _exit(code: int) -> NoReturn:
    # os._exit: skip PyKCS11's finalizers, which some vendor modules crash in.
    sys.stderr.flush()
    os._exit(code)


def main() -> NoReturn:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    forbid_core_dumps()  # before the PIN arrives: no core of this process holds it
    _die_with_parent()
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # vendor chatter on stdout goes to stderr, not into the replies
    channel = _Channel(0, reply_fd)

    init = channel.read()
    if init is None:
        _exit(0)
    try:
        if not isinstance(init, dict) or init.get("op") != "init":
            raise Failure("error", "first message must be init")
        slot = init.get("slot")
        token = Token(str(init.get("module")), init.get("token_label"), slot)
        pin = init.get("pin")
        if not isinstance(pin, str):
            raise Failure("error", "no PIN given")
        token.open(pin)
        del pin, init
    except Failure as failure:
        channel.write({"ok": False, "kind": failure.kind, "message": failure.message})
        _exit(2)
    except Exception as err:  # a broken module; report the type, never the PIN
        channel.write({"ok": False, "kind": "error", "message": f"worker init failed: {err!r}"})
        _exit(2)
    channel.write({"ok": True, "pid": os.getpid()})

    while True:
        message = channel.read()
        if message is None:
            with contextlib.suppress(Exception):
                token._session.closeSession()
            _exit(0)
        request_id = _request_id(message)
        fatal = False
        try:
            frame = reply_for(request_id, handle(token, message))
        except Failure as failure:
            fatal = failure.fatal
            reply = {
                "id": request_id,
                "ok": False,
                "kind": failure.kind,
                "message": failure.message,
            }
            if fatal:
                reply["fatal"] = True  # the pool may retry the request on another worker
        except wire.FrameError as err:
            reply = {"id": request_id, "ok": False, "kind": "error", "message": str(err)}
        except Exception as err:
            reply = {
                "id": request_id,
                "ok": False,
                "kind": "unavailable",
                "message": f"worker error: {err!r}",
                "fatal": True,
            }
            fatal = True
        else:
            channel.write_frame(frame)
            continue
        channel.write(reply)
        if fatal:
            _exit(3)


if __name__ == "__main__":
    main()
