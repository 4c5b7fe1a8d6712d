"""The PSAM's vocabulary (card-spec §3.5), shared by the emulated PSAM and the daemon.

Two key environments: the 8-byte-algorithm (3DES) one under the MF ``3F00`` named
``sx1.sh.社会保障`` and the 16-byte-algorithm (SM4) one under DDF ``DDF1`` named
``sx2.sh.社会保障``, each holding the application ``D15600000590``. Key ids inside the spec's
ranges (08–0F national keys of the user card's DDF level, 20–3F of its applications) are this
project's assignment.
"""

from __future__ import annotations

from apdu_specs import filesystem
from apdu_specs.crypto import Algorithm

PSAM_AID = bytes.fromhex("D15600000590")
ENV_NAMES = {
    "des3": filesystem.SSSE_AID,  # "sx1.sh.社会保障"
    "sm4": bytes.fromhex("7378322E73682EC9E7BBE1B1A3D5CF"),  # "sx2.sh.社会保障"
}
ENV_FIDS = {"des3": 0x3F00, "sm4": 0xDDF1}
ENV_ALG = {"des3": Algorithm.DES3, "sm4": Algorithm.SM4}

# PSAM key ids: 08–0F national keys of the user card's DDF (SSSE) level, 20–3F national keys of
# the user card's applications (card-spec §3.5 ranges; the assignment inside them is ours).
PSAM_KEY_IDS: dict[str, int] = {
    "IRK": 0x08, "STKSSSE": 0x09, "UKSSSE": 0x0A, "BK": 0x0B, "PUK": 0x0C, "RKSSSE": 0x0D,
    "STKDF04": 0x20, "LKDF04": 0x21, "RK1DF04": 0x22, "UK1DF04": 0x23, "UK2DF04": 0x24,
    "STKDF01": 0x28, "RK1DF01": 0x29, "STKDF02": 0x2C, "RK1DF02": 0x2D,
    "STKDF03": 0x30, "RK1DF03": 0x31, "RK2DF03": 0x32,
}
TERMINAL_KEYS = ("IRK", "RKSSSE", "RK1DF04", "UK1DF04", "UK2DF04")
SERVICE_HALL_KEYS = (*TERMINAL_KEYS, "PUK", "STKSSSE", "UKSSSE")

USAGE_MAC_ENC = 0x08  # key type b5–b1 (card-spec §3.5): 8 = MAC + encryption


def usage_byte(levels: int, key_type: int = USAGE_MAC_ENC) -> int:
    return (levels << 5) | key_type



TERMINAL_NO_SFI = 0x16  # file 0016: terminal number, 6 bytes BCD
ALG_ENV = {alg: env for env, alg in ENV_ALG.items()}
