"""The protocol layer: rules decided in advance, sweeps over seeds and settings, promotion chains that compose runs."""
