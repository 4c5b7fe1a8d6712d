"""The emulated social security card and PSAM: a small card operating system and its front-ends."""
