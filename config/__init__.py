"""The configuration layer: every setting (``config.settings``) and the Kafka client
configuration built from them (``config.kafka``). It sits on the contract (``schemas``) and
under everything else: the rules, the worker, the SDKs and the tools read their settings
here, and it imports none of them (tests/test_layers.py)."""
