"""A simulated Mail Partner API: deterministic sends whose recipient reports evolve over time.

``World`` holds the sends, ``SimulatorServer`` serves them over HTTP like api.mailpartner.fr
(with fault knobs), and a second world's like its sister api.smspartner.fr under
``/smspartner/v1``; ``DemoCampaign`` fills a world with sends of every age.
"""

from exporter.simulator.control import Faults
from exporter.simulator.demo import DemoCampaign
from exporter.simulator.model import RecipientReport, SimulatedSend, World
from exporter.simulator.server import SimulatorServer

__all__ = ["DemoCampaign", "Faults", "RecipientReport", "SimulatedSend", "SimulatorServer", "World"]
