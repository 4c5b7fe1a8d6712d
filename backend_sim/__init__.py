"""The settlement backend simulator (``sscard-backend``).

It speaks the backend contract of the README's "Backend simulator" section over MQTT 5: requests
on ``sscard/v1/settle/req/{terminal_id}`` consumed through the shared subscription
``$share/settle/sscard/v1/settle/req/+``, answers on the requesting terminal's
``sscard/v1/term/{terminal_id}/settle/resp``. Any number of instances share one SQLite ledger.

Modules: ``money`` (yuan strings ↔ fen), ``seed`` (the TOML seed), ``errors`` (refusal codes),
``envelope`` (request envelope and expiry), ``split`` (the fund/account/cash split), ``ledger``
(SQLite, the transactions), ``faults`` (fault controls for tests), ``service`` (MQTT),
``logs`` (redacting logs), ``cli`` (``sscard-backend``).

Imports only ``apdu_specs`` of this project (never ``sscardd`` nor ``firmware_sim``).
"""
