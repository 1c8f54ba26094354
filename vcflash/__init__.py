"""vcflash: streaming video understanding on VideoChat-Flash. The `vcflash` command lives in `vcflash.cli`."""
