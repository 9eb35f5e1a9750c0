"""`python -m biomass.registry`: the registered components and the winners' knobs, the same listing as
`python -m biomass.components` (which imports every registering module; the registry itself imports none)."""
import runpy

if __name__ == "__main__":
    runpy.run_module("biomass.components", run_name="__main__", alter_sys=True)
