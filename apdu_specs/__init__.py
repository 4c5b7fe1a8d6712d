"""The shared vocabulary of sscardd: APDU layouts, status words, records, fields and algorithms.

Imports nothing of the rest of the project; the emulator, the daemon and the backend all use it.
"""
