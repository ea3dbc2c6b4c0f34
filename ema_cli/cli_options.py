"""Command-line options that several subcommand modules (``cli``, ``cli_names``) share, defined once."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Suffix = Annotated[str, typer.Option("--suffix", metavar="NAME", help="Shadow-name suffix: the shadow of x is x/SUFFIX.")]
Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
StorageOption = Annotated[Optional[List[str]], typer.Option("--storage-option", metavar="KEY=VALUE", help="fsspec option for s3://, gs://, ... paths (repeatable; a.b=v nests), beside the filesystem's own configuration (env vars, ~/.aws, FSSPEC_<PROTOCOL>_<OPTION>).")]
