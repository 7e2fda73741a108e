"""The person's side of mamlpp: the Typer CLI, the Textual dashboard and rich output."""
