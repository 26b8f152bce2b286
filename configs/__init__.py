"""The run configs (ml_collections): `configs/base.py` holds the seed's recipe; the others
override a few of its fields. Pass one to `main.py --config=configs/<name>.py`, or import it
(`from configs import base`) from the repository root."""
