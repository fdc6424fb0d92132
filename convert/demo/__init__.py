"""The demo model's recipe: build.py, tower.py, pooling.py, package.py, card.py."""
