"""`ftlab`: LightningCLI with the links, checkpoint shortcuts and one-line errors (`cli/main.py`)."""
