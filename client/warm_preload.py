"""Imported only by the site's ClientApp fork server (client.warm.WarmLauncher): importing it
imports what every ClientApp message needs, once, and records the sources it came from."""

from client.warm import preload

preload()
