"""The rules: plain Python, no Kafka or Faust import. Agents call these."""
