"""SPA: the conventional CTR model (DIN), the projector and soft-token insertion."""
