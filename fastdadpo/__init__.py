"""fastdadpo: distill a large teacher LLM into a small student with daDPO and its relatives,
fast and in little memory."""
__version__ = "0.1.0"
