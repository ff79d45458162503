from ingestd.cli import app

app(prog_name="ingestd")
