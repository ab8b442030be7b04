from mixq.cli import run

run()
