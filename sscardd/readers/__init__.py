"""Readers: one async interface (:mod:`sscardd.readers.base`), three transports."""
