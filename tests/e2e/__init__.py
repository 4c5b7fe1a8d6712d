"""End-to-end tests against real pcscd+vpcd and real mosquitto."""
