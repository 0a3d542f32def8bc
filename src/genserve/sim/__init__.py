"""Fleet-scale simulation of the production engine. See docs/simulator.md."""
from .driver import SimResult, Simulator, simulate
from .scenario import Scenario, load_scenario, variant

__all__ = ["Scenario", "SimResult", "Simulator", "load_scenario", "simulate", "variant"]
