"""The project's top floor: the `lvlm` command that mounts every package's commands."""
