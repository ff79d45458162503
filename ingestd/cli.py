"""The ``ingestd`` command: a thin layer over functions a notebook can call too."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ingestd import __version__
from ingestd.settings import Settings

app = typer.Typer(
    help="ingestd streams text corpora into a KATO hierarchy, fast and exactly.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
kato_app = typer.Typer(
    help="The embedded KATO 3.10.1-compatible engine.",
    no_args_is_help=True,
)
app.add_typer(kato_app, name="kato")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ingestd {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """ingestd streams text corpora into a KATO hierarchy, fast and exactly."""


def _overrides(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


@kato_app.command("serve")
def kato_serve(
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to listen on (default 8000).")] = None,
    data: Annotated[
        Optional[Path], typer.Option("--data", help="Directory of the knowledge store (default ./kato-data).")
    ] = None,
    durability: Annotated[
        Optional[str],
        typer.Option(help="full: fsync every commit (default). normal: survive kill -9 and restarts, not power loss."),
    ] = None,
    persistence: Annotated[Optional[int], typer.Option(help="KATO's PERSISTENCE, emotives kept per pattern (default 5).")] = None,
    session_ttl: Annotated[Optional[int], typer.Option(help="KATO's SESSION_TTL in seconds (default 3600).")] = None,
) -> None:
    """Serve KATO 3.10.1's HTTP API from the embedded engine, storing knowledge bases in --data.

    Sessions and knowledge bases are durable: a restart (even kill -9) loses no
    acknowledged learn, and sessions that have not expired survive it.
    """
    from ingestd.engine.serve import serve

    settings = Settings()
    server = settings.server.model_validate(
        {**settings.server.model_dump(), **_overrides(
            host=host, port=port, data_dir=data, durability=durability, persistence=persistence,
            session_ttl=session_ttl)}
    )  # fmt: skip
    serve(server)


@kato_app.command("demo")
def kato_demo(
    corpus: Annotated[Path, typer.Argument(help="A text file; paragraphs are runs of non-blank lines.")],
    paragraphs: Annotated[int, typer.Option(min=1, help="How many paragraphs to learn.")] = 300,
    chunk_size: Annotated[int, typer.Option(min=2, help="Tokens per node0 pattern.")] = 8,
) -> None:
    """Start the embedded server, learn paragraphs of CORPUS through its HTTP API, and show what was learned."""
    from rich.console import Console

    from ingestd.demo import run_demo

    if not corpus.is_file():
        raise typer.BadParameter(f"{corpus} is not a readable file: give the path of a UTF-8 text file", param_hint="CORPUS")
    run_demo(corpus, paragraphs, chunk_size, Console())


if __name__ == "__main__":
    app()
